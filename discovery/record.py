"""What a node says about itself in its ``_expertmesh._tcp`` TXT record.

    name=mini-a  proto=1  version=0.1.0  model=Qwen3-30B-A3B-4bit  config=3f2a…
    mem=12000000000  state=ready  held=0-47:0-42  weights=9c01….5e7a…

``held`` groups layers that hold the same experts, ``LAYERS:EXPERTS`` in
compact ranges joined by ``;``. A TXT string holds at most 255 bytes, so a
long value continues in ``held1``, ``held2``, … (a node whose list would pass
``MAX_HELD_CHARS`` leaves it out).

Records come from anyone on the network, so reading one is bounded: at most
``MAX_TXT_BYTES`` and ``MAX_KEYS``, short printable strings, and layer and
expert ids below ``Bounds`` (the model's own counts once the router knows
them, small absolute caps before), so "0-99999:0-99999" is refused in
microseconds instead of becoming 10^10 integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from expertmesh.ranges import compact, expand

SERVICE_TYPE = "_expertmesh._tcp.local."
STATES = ("idle", "loading", "ready")
_CHUNK = 240
MAX_TXT_BYTES = 4096   # a whole record (an mDNS packet carries about 9000 bytes in all)
MAX_KEYS = 32
MAX_HELD_CHARS = 3072  # the held list; longer ones are left out of the record
MAX_PAIRS = 1 << 16    # (layer, expert) pairs one record may name: DeepSeek V3 has 15,616
_TEXT_LIMITS = {"name": 63, "model": 200, "config": 64, "version": 32, "proto": 6, "mem": 19, "state": 8}


@dataclass(frozen=True)
class Bounds:
    """What a record may name: layer ids below ``layers``, expert ids below
    ``experts``. With ``config_hash``, those are one model's counts, and
    records of other models (refused anyway) are held to the absolute caps."""

    layers: int = 512
    experts: int = 2048
    config_hash: str = ""

    def of(self, config_hash: str) -> "Bounds":
        return self if not self.config_hash or config_hash == self.config_hash else Bounds()


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
        if len(held) > MAX_HELD_CHARS:  # routers do not need it; `expertmesh discover` shows none
            held = ""
        txt = {"name": self.name, "proto": str(self.protocol), "version": self.version,
               "model": self.model_id, "config": self.config_hash,
               "mem": str(self.memory_budget), "state": self.state, "weights": self.weights_hash}
        for i in range(0, max(len(held), 1), _CHUNK):
            txt[f"held{i // _CHUNK or ''}"] = held[i:i + _CHUNK]
        return txt

    @classmethod
    def from_txt(cls, txt: dict[bytes, bytes | None], bounds: Bounds = Bounds()) -> "NodeRecord":
        """Raises ValueError: a field is missing, malformed or too long, or the record is too large."""
        size = sum(len(k) + len(v or b"") + 2 for k, v in txt.items())
        if size > MAX_TXT_BYTES or len(txt) > MAX_KEYS:
            raise ValueError(f"{size} bytes in {len(txt)} keys; at most {MAX_TXT_BYTES} bytes in {MAX_KEYS} keys")
        t = {k.decode(): (v or b"").decode() for k, v in txt.items()}
        missing = [k for k in ("name", "proto", "model", "config", "mem", "state") if k not in t]
        if missing:
            raise ValueError(f"TXT record lacks {', '.join(missing)}")
        for key, limit in _TEXT_LIMITS.items():
            value = t.get(key, "")
            if len(value) > limit or not value.isprintable():
                raise ValueError(f"{key} is not printable text of at most {limit} characters")
        if t["state"] not in STATES:
            raise ValueError(f"unknown state {t['state']!r}")
        if not (t["proto"].isdigit() and t["mem"].isdigit()) or int(t["mem"]) >= 1 << 63:
            raise ValueError("proto and mem must be non-negative whole numbers")
        held_text = "".join(t.get(f"held{i or ''}", "") for i in range(len(t)))
        if len(held_text) > MAX_HELD_CHARS:
            raise ValueError(f"held is {len(held_text)} characters; at most {MAX_HELD_CHARS}")
        held = _held(held_text, bounds.of(t["config"]))
        weights = t.get("weights", "")
        if len(weights) > 64:
            raise ValueError("weights identity longer than 64 characters")
        return cls(t["name"], int(t["proto"]), t["model"], t["config"], int(t["mem"]),
                   t["state"], held, t.get("version", ""), weights)


def _held(text: str, bounds: Bounds) -> dict[int, list[int]]:
    """``LAYERS:EXPERTS;…`` -> layer -> expert ids (one list per group, shared by its layers)."""
    held: dict[int, list[int]] = {}
    pairs = 0
    for group in filter(None, text.split(";")):
        layers, _, experts = group.partition(":")
        try:
            layer_ids, expert_ids = expand(layers, bounds.layers), expand(experts, bounds.experts)
        except ValueError as e:
            raise ValueError(f"held group {group[:40]!r}: {e}") from None
        pairs += len(layer_ids) * len(expert_ids)
        if pairs > MAX_PAIRS:
            raise ValueError(f"held names more than {MAX_PAIRS} (layer, expert) pairs")
        for layer in layer_ids:
            held[layer] = expert_ids
    return held
