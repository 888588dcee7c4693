"""What a node says about itself in its ``_expertmesh._tcp`` TXT record.

    name=mini-a  proto=1  version=0.1.0  model=Qwen3-30B-A3B-4bit  config=3f2a…
    mem=12000000000  state=ready  held=0-47:0-42  weights=9c01….5e7a…

``held`` groups layers that hold the same experts, ``LAYERS:EXPERTS`` in
compact ranges joined by ``;``. A TXT string holds at most 255 bytes, so a
long value continues in ``held1``, ``held2``, …
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ranges import compact, expand

SERVICE_TYPE = "_expertmesh._tcp.local."
STATES = ("idle", "loading", "ready")
_CHUNK = 240


@dataclass(frozen=True)
class NodeRecord:
    name: str                 # the node's own name (``--name``)
    protocol: int             # wire protocol version
    model_id: str             # the checkpoint's name
    config_hash: str          # hash of its config.json
    memory_budget: int        # bytes of experts it may hold
    state: str = "idle"       # one of STATES
    held: dict[int, list[int]] = field(default_factory=dict)  # layer -> expert ids
    version: str = ""         # expertmesh version
    weights_hash: str = ""    # the checkpoint's weights identity (Checkpoint.identity)

    def to_txt(self) -> dict[str, str]:
        groups: dict[str, list[int]] = {}
        for layer, experts in sorted(self.held.items()):
            if experts:
                groups.setdefault(compact(experts), []).append(layer)
        held = ";".join(f"{compact(layers)}:{experts}" for experts, layers in groups.items())
        txt = {"name": self.name, "proto": str(self.protocol), "version": self.version,
               "model": self.model_id, "config": self.config_hash,
               "mem": str(self.memory_budget), "state": self.state, "weights": self.weights_hash}
        for i in range(0, max(len(held), 1), _CHUNK):
            txt[f"held{i // _CHUNK or ''}"] = held[i:i + _CHUNK]
        return txt

    @classmethod
    def from_txt(cls, txt: dict[bytes, bytes | None]) -> "NodeRecord":
        """Raises ValueError: a field is missing or malformed."""
        t = {k.decode(): (v or b"").decode() for k, v in txt.items()}
        missing = [k for k in ("name", "proto", "model", "config", "mem", "state") if k not in t]
        if missing:
            raise ValueError(f"TXT record lacks {', '.join(missing)}")
        if t["state"] not in STATES:
            raise ValueError(f"unknown state {t['state']!r}")
        held_text = "".join(t.get(f"held{i or ''}", "") for i in range(len(t)))
        held: dict[int, list[int]] = {}
        for group in filter(None, held_text.split(";")):
            layers, _, experts = group.partition(":")
            for layer in expand(layers):
                held[layer] = expand(experts)
        weights = t.get("weights", "")
        if len(weights) > 64:
            raise ValueError("weights identity longer than 64 characters")
        return cls(t["name"], int(t["proto"]), t["model"], t["config"], int(t["mem"]),
                   t["state"], held, t.get("version", ""), weights)
