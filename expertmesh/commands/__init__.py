"""One module per ``expertmesh`` subcommand.

Each module has ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args)``; ``expertmesh.cli`` finds them by name, so adding a command
is adding a module.
"""
