"""Test fixtures, shared by tests/, benchmarks/ and ``make demo``; nothing in the runtime imports them.

- ``tinymodel``, ``families``: tiny random-weight checkpoints of every supported family.
- ``process``: a child ``expertmesh`` process whose output can be waited on.
- ``netns``: Linux network namespaces, so mDNS never reaches the real network.
- ``certs``: a test CA and mutual-TLS certificates (``make certs``).
- ``load``: a mesh of node processes under concurrent streams (tests/test_load.py, benchmarks/load.py).
"""
