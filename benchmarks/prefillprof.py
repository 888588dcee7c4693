"""Where a prompt's prefill time goes, on the device: ``requestprof.py
MODEL --parts prefill`` runs :func:`prefill` (``--prefill-tokens``, 512 by
default). µs, a sync each, medians of alternating rounds: mlx-lm's own layer
(its attention and its MoE block alone) and span, a node's expert request for
half the experts and its parts, the router's side of an expert-mode layer
(its nodes' answers added on the device, as the dispatcher adds a prompt's,
and on the host), and a node's stage span.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from requestprof import profiled, put, rounds

from expertmesh import wire
from expertmesh.checkpoint import Checkpoint
from expertmesh.nodes.core import NodeCore
from expertmesh.nodes.store import ExpertStore
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.worker import MLXWorker


def _on_the_wire(message) -> bytes:
    """The bytes ``wire.send_frame`` would send after the length prefix, in
    one copy, as the socket's own copy of them would be."""
    if isinstance(message, wire.Framed):
        heads, view = message.tail()
        return b"".join([message.message.SerializeToString(), heads, view])
    return message.SerializeToString()


def prefill(r: dict, model: Path, prof: Path | None, T: int = 512, span: tuple[int, int] = (0, 6)) -> None:
    """A prompt of ``T`` tokens, piece by piece (µs, a sync each): mlx-lm's
    layer (its attention and its MoE block alone), a node's expert request
    for half the experts and its parts, the router's side of the layer, and
    a stage span against mlx-lm's same layers."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from expertmesh.router import dispatcher
    from expertmesh.router.link import expert_request
    from expertmesh.nodes.store import _combine

    local, _ = load(str(model))
    args = local.args
    H, E, k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    layers = local.model.layers
    moe = next(i for i, l in enumerate(layers) if hasattr(l.mlp, "switch_mlp"))
    x = (mx.random.normal((1, T, H)) * 0.5).astype(mx.bfloat16)
    mx.eval(x)
    layer = layers[moe]

    def mlx_layer():
        mx.eval(layer(x, "causal", make_prompt_cache(local)[moe]))

    def mlx_attention():
        mx.eval(layer.self_attn(layer.input_layernorm(x), "causal", make_prompt_cache(local)[moe]))

    normed = layer.post_attention_layernorm(x)
    mx.eval(normed)

    def mlx_moe():
        mx.eval(layer.mlp(normed))

    gates = mx.softmax(layer.mlp.gate(normed).astype(mx.float32), axis=-1)
    inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    scores = mx.take_along_axis(gates, inds, axis=-1)
    mx.eval(inds, scores)

    def mlx_switch():
        mx.eval(layer.mlp.switch_mlp(normed, inds))

    span_layers = layers[span[0]:span[1]]

    def mlx_span():
        cache = make_prompt_cache(local)
        h = x
        for l, c in zip(span_layers, cache[span[0]:span[1]]):
            h = l(h, "causal", c)
        mx.eval(h)

    put(r, {f"prefill_mlxlm_{name}_us": v for name, v in rounds(
        {"layer": mlx_layer, "attention": mlx_attention, "moe": mlx_moe, "switch": mlx_switch,
         "span": mlx_span}, n=5, warm=2, repeat=3).items()})
    del local

    # the router's side of an expert-mode layer, the node holding half the experts
    store = ExpertStore(Checkpoint(model))
    mine = list(range(E // 2))
    store.assign({moe: mine})
    worker = MLXWorker("prof-prefill")
    node = NodeCore("prof", store, 1 << 40, worker)
    flat_x, flat_i, flat_s = x.reshape(T, H), inds.reshape(T, k), scores.reshape(T, k)
    hidden, ids, weights = dispatcher._to_host(flat_x, flat_i, flat_s)
    ids_mine = np.where(ids < len(mine), ids, -1).astype(np.int32)
    w_mine = np.where(ids_mine >= 0, weights, 0.0).astype(np.float32)
    frame = expert_request(moe, hidden, pb.BFLOAT16, ids_mine, w_mine)
    frame.request_id = 1
    wire_bytes = _on_the_wire(frame)
    reply = node.worker.run(lambda: _on_the_wire(node.forward_framed(pb.ForwardRequest.FromString(wire_bytes))))
    held = store.layers[moe]
    pair = np.flatnonzero(ids_mine.reshape(-1) >= 0)
    tok = mx.array((pair // k).astype(np.int32))
    lids = mx.array(held.local[ids_mine.reshape(-1)[pair]])
    w = mx.array(w_mine.reshape(-1)[pair])
    hid = wire.from_numpy(hidden, pb.BFLOAT16)
    mx.eval(tok, lids, w, hid)
    y = held.mlp(hid[tok], lids[:, None])[:, 0, :]
    mx.eval(y)

    def router_read():
        dispatcher._to_host(flat_x, flat_i, flat_s)

    def router_request():
        _on_the_wire(expert_request(moe, hidden, pb.BFLOAT16, ids_mine, w_mine))

    def router_reply(adder=dispatcher._DeviceSum):
        out = adder(hidden.shape)
        for _ in range(2):  # two nodes' answers, added (on the device, as the dispatcher does for a prompt)
            out.add(None, wire.decode_numpy(pb.ForwardResponse.FromString(reply).output, "output"), pb.BFLOAT16)
        mx.eval(out.array(pb.BFLOAT16))

    def node_request():
        _on_the_wire(node.forward_framed(pb.ForwardRequest.FromString(wire_bytes)))

    def node_combine():
        mx.eval(_combine(held.mlp, hid, tok, lids, w))

    def node_mlp():
        mx.eval(held.mlp(hid[tok], lids[:, None]))

    def node_scatter():
        mx.eval(mx.zeros((T, H), dtype=mx.float32).at[tok].add(y * w[:, None]).astype(mx.bfloat16))

    def run():
        put(r, {f"prefill_{name}_us": v for name, v in rounds(
            {"router_read": router_read, "router_request": router_request, "router_reply": router_reply,
             "router_reply_host": lambda: router_reply(dispatcher._Sum),
             "node_request": node_request, "node_combine": node_combine, "node_mlp": node_mlp,
             "node_scatter": node_scatter}, n=5, warm=2, repeat=3).items()})
        profiled(node_request, 5, prof, "prefill_node_request")

        node.stages.assign([span])
        seq = [100]

        def stage_direct():
            seq[0] += 1
            node.stages.forward(span[0], x, [seq[0]], [])
            node.stages.release([seq[0]])

        sreq = pb.ForwardRequest(request_id=2, stage=pb.StageRequest(
            layer=span[0], hidden=wire.encode_numpy(hidden.reshape(1, T, H), pb.BFLOAT16), sequences=[1]))

        def stage_request():
            seq[0] += 1
            sreq.stage.sequences[0] = seq[0]
            node.forward(pb.ForwardRequest.FromString(sreq.SerializeToString())).SerializeToString()
            node.stages.release([seq[0]])

        put(r, {f"prefill_stage_{name}_us": v for name, v in rounds(
            {"direct": stage_direct, "request": stage_request}, n=5, warm=2, repeat=3).items()})
        profiled(stage_request, 5, prof, "prefill_stage_request")

    node.worker.run(run)
    node.worker.close()
    r["prefill_tokens"], r["prefill_node_pairs"], r["prefill_span_layers"] = T, int(pair.size), span[1] - span[0]
