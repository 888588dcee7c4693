"""expertmesh chat: talk to the model through a router, in the terminal."""

import json
import sys

from ..errors import InvalidRequestError
from ..signals import interruptible
from . import add_sampling_arguments, connect, router_arguments, sampling_options

HELP = "chat with the model through a router (/quit or Ctrl-D to leave)"

_COMMANDS = "/reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply"


def add_arguments(p) -> None:
    router_arguments(p)
    p.add_argument("--system-prompt", default=None, help="a system message that opens the conversation")
    p.add_argument("--chat-template-config", default=None, metavar="JSON",
                   help='passed to the chat template, e.g. \'{"enable_thinking": false}\'')
    add_sampling_arguments(p)


def run(args) -> None:
    options = sampling_options(args)
    template_kwargs = _template_kwargs(args.chat_template_config)
    opening = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    with connect(args) as client:
        model = client.cluster().model_id  # an unreachable router fails here, in one line
        print(f"chatting with {model} through {args.router}; {_COMMANDS}", flush=True)
        history = list(opening)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return
            command = line.strip()
            if not command:
                continue
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                history = list(opening)
                print("[conversation cleared]")
                continue
            if command.startswith("/") and not command.startswith("//"):
                print(f"[unknown command {command.split()[0]}: {_COMMANDS}; start a message with // to send "
                      "one that begins with /]")
                continue
            if command.startswith("//"):
                line = line.replace("/", "", 1)
            history.append({"role": "user", "content": line})
            reply = _reply(client, history, options, template_kwargs)
            if reply is None:
                history.pop()
            else:
                history.append({"role": "assistant", "content": reply})


def _reply(client, history, options, template_kwargs) -> "str | None":
    """Stream one reply; None when it was interrupted or refused."""
    text, last = [], None
    try:
        for piece in interruptible(client.chat(history, options, chat_template_kwargs=template_kwargs)):
            print(piece.text, end="", flush=True)
            text.append(piece.text)
            last = piece
    except KeyboardInterrupt:
        print("\n[interrupted]")
        return None
    except InvalidRequestError as e:  # e.g. the conversation outgrew the context
        print(f"\n[refused: {e}; /reset starts over]")
        return None
    print()
    if last is not None:
        print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s, "
              f"prompt {last.prompt_tokens} tokens]", file=sys.stderr, flush=True)
    return "".join(text)


def _template_kwargs(text: "str | None") -> "dict | None":
    if text is None:
        return None
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise InvalidRequestError(f"--chat-template-config is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise InvalidRequestError("--chat-template-config must be a JSON object")
    return kwargs
