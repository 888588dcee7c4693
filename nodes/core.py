"""A node's core: what it holds, whom it serves, and the requests it answers.

Plain Python, no transport: the gRPC servicer (``service.py``) and the data
plane (``dataplane.py``) both call it, and it raises ``expertmesh.errors``
types that they turn into status codes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from typing import Callable, Iterator

import mlx.core as mx

from expertmesh import __version__, wire
from expertmesh.errors import (BusyError, ConfigMismatchError, ExpertmeshError, InvalidRequestError,
                               OwnershipError, RequestTooLargeError)
from expertmesh.metrics import Histogram
from expertmesh.serving import PROTOCOL_VERSION, layer_experts
from expertmesh.staging import Staging
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.worker import MLXWorker

from expertmesh.nodes.stages import MAX_SEQUENCES, StageStore
from expertmesh.nodes.store import ExpertStore

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the router id of a caller that gives none

# Measure times one layer after this many tokens at most: its KV stays small
MAX_MEASURE_CONTEXT = 4096

# sequence ids one request may name: a stage step (one a row) or a release
MAX_STEP_SEQUENCES = MAX_SEQUENCES
MAX_RELEASE = 1 << 16

_HIDDEN_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)


class NodeCore:
    """The node's state and operations; ``forward`` runs on a thread allowed to use mlx."""

    def __init__(self, name: str, store: ExpertStore, memory_budget: int, worker: MLXWorker,
                 stages: StageStore | None = None):
        self.name = name
        self.stages = stages or StageStore(store)
        self.worker = worker
        self.store = store
        self.memory_budget = memory_budget
        self.on_state_change: Callable[[], None] = lambda: None  # e.g. republish the TXT record
        self.state = pb.IDLE
        self.data_port = 0  # set by the Node once its data plane listens
        self.token_required = False  # the data plane wants a DataPlaneHello first
        self.stats = pb.NodeStats()
        self.compute = Histogram()  # seconds per Forward request
        self._assign_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # the router this node serves (id "" when none) and the epoch of its hold: see RouterIdentity
        self.router = pb.RouterIdentity()
        self.epoch = 0
        self._router_lock = threading.Lock()
        self.on_router_change: Callable[[], None] = lambda: None  # e.g. the data plane drops its connections
        self._local = threading.local()  # each MLX thread's Staging: its requests run one at a time

    def _staging(self) -> Staging:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = Staging()
        return staging

    @property
    def state(self) -> int:
        return self._state

    @state.setter
    def state(self, state: int) -> None:
        self._state = state
        self.on_state_change()

    def info(self) -> pb.NodeInfo:
        """What the node is and holds; never waits for a computation (GetInfo, metrics)."""
        ck = self.store.checkpoint
        kv_bytes, kv_sequences = self.stages.usage()
        return pb.NodeInfo(
            name=self.name, version=__version__, protocol_version=PROTOCOL_VERSION,
            model_id=ck.model_id, config_hash=ck.config_hash, weights_hash=ck.identity.weights,
            memory_budget_bytes=self.memory_budget, memory_used_bytes=self.store.nbytes + self.stages.nbytes,
            state=self.state, held=layer_experts(self.store.held()), data_port=self.data_port,
            token_required=self.token_required,
            stages=[pb.LayerSpan(start=s.start, end=s.end) for s in self.stages.spans.values()],
            kv_cache_bytes=kv_bytes, kv_sequences=kv_sequences,
            router=self.router, epoch=self.epoch,
        )

    # --- one router at a time (RouterIdentity) ------------------------------------
    def claim(self, router: pb.RouterIdentity, peer: str) -> int:
        """Serve ``router`` from now on, unless another holds this node and it
        does not take over; returns the epoch of its hold.

        Raises:
            OwnershipError: another router holds the node.
        """
        if not router.id:  # a tool (grpcurl, a test) that names no router holds the node as one
            router = pb.RouterIdentity(id=ANONYMOUS, address=peer, takeover=router.takeover)
        with self._router_lock:
            holder = self.router
            if holder.id not in ("", ANONYMOUS, router.id) and not router.takeover:  # tools hold no node from routers
                raise OwnershipError(
                    f"node {self.name} serves router {holder.id[:8]} at {holder.address}: stop that router, or "
                    f"start this one with --takeover to take the node from it")
            changed = holder.id != router.id
            if changed:
                self.epoch += 1
            self.router = pb.RouterIdentity(id=router.id, address=router.address)
            epoch = self.epoch
        if changed and holder.id:
            logger.warning("router %s at %s takes node %s over from router %s at %s", router.id[:8], router.address,
                           self.name, holder.id[:8], holder.address)
        if changed:  # what was opened before belongs to no one now
            self._drop_router_state()
        return epoch

    def held_by_router(self) -> bool:
        """A router holds this node: data-plane connections must name it in their hello."""
        with self._router_lock:
            return self.router.id not in ("", ANONYMOUS)

    def _drop_router_state(self) -> None:
        """What the last router left: its data-plane connections and its sequences' KV."""
        self.on_router_change()
        self.worker.submit(lambda: self.stages.release(set(self.stages.sequences)))

    def hello_error(self, hello: pb.DataPlaneHello) -> str:
        """Why a data-plane hello is refused ("" when the router holding this node says it)."""
        with self._router_lock:
            holder, epoch = self.router, self.epoch
        if not holder.id:
            return f"node {self.name} serves no router: Assign it first"
        if hello.router_id != holder.id or hello.epoch != epoch:
            return (f"node {self.name} serves router {holder.id[:8]} at {holder.address} (epoch {epoch}), "
                    f"not router {hello.router_id[:8] or '(none)'} (epoch {hello.epoch}): it was taken over")
        return ""

    def release(self, router_id: str, epoch: int) -> None:
        """The router holding the node at ``epoch`` lets it go (anything else is ignored)."""
        with self._router_lock:
            released = bool(router_id) and router_id == self.router.id and epoch == self.epoch
            if released:
                self.router = pb.RouterIdentity()
        if released:
            logger.info("router %s released node %s", router_id[:8], self.name)
            self._drop_router_state()

    # --- loading: Assign, AssignStages, Measure -----------------------------------
    def _check_checkpoint(self, config_hash: str, weights_hash: str) -> None:
        ck = self.store.checkpoint
        if config_hash != ck.config_hash:
            raise ConfigMismatchError(
                f"node {self.name} serves {ck.model_id} (config {ck.config_hash}), not config {config_hash}")
        if weights_hash and weights_hash != ck.identity.weights:
            raise ConfigMismatchError(f"node {self.name} serves {ck.model_id}; the router has "
                                      f"{ck.identity.difference(config_hash, weights_hash, 'this node')}")

    def _check_budget(self, need: int, what: str) -> None:
        if need > self.memory_budget:
            raise RequestTooLargeError(
                f"node {self.name}: {what} {need / 1e9:.2f} GB, budget is {self.memory_budget / 1e9:.2f} GB")

    def _lock_loading(self) -> None:
        """Take the one loading slot or raise ``BusyError``; the caller releases it."""
        if not self._assign_lock.acquire(blocking=False):
            raise BusyError(f"node {self.name} is already loading an assignment")

    def assign(self, request: pb.AssignRequest, peer: str = "") -> Iterator[pb.AssignProgress]:
        """Hold exactly ``request.experts`` afterwards; yields the loading's progress, the last one ``done``."""
        self._check_checkpoint(request.config_hash, request.weights_hash)
        epoch = self.claim(request.router, peer)
        wanted = {le.layer: list(le.experts) for le in request.experts}
        if len(wanted) != len(request.experts):
            layers = [le.layer for le in request.experts]
            twice = next(l for l in layers if layers.count(l) > 1)
            raise InvalidRequestError(f"layer {twice} is listed more than once")
        self.store.validate_assignment(wanted)
        need = sum(self.store.expert_bytes(l) * len(e) for l, e in wanted.items()) + self.stages.nbytes
        self._check_budget(need, "assignment needs")
        self._lock_loading()
        try:
            self.state = pb.LOADING
            layers_total = len(wanted)
            self.stages.halt()  # the GPU loads nothing behind a stage step waiting for its request
            yield from self._loading(lambda progress: self.store.assign(wanted, progress), layers_total)
            self.state = pb.READY
            yield pb.AssignProgress(loaded_bytes=self.store.nbytes, total_bytes=self.store.nbytes,
                                    layers_done=layers_total, layers_total=layers_total, done=True, epoch=epoch)
        except ExpertmeshError:
            self.state = pb.IDLE
            raise
        finally:
            self._assign_lock.release()

    def assign_stages(self, request: pb.AssignStagesRequest, peer: str = "") -> Iterator[pb.AssignProgress]:
        """Hold exactly ``request.stages`` (spans of whole layers) afterwards; yields progress as ``assign``."""
        self._check_checkpoint(request.config_hash, request.weights_hash)
        epoch = self.claim(request.router, peer)
        spans = [(s.start, s.end) for s in request.stages]
        self.stages.validate(spans)
        self._check_budget(self.stages.span_bytes(spans) + self.store.nbytes, "stages and experts need")
        self._lock_loading()
        try:
            layers = sum(b - a for a, b in spans)
            yield from self._loading(lambda progress: self.stages.assign(spans, progress), layers)
        finally:
            self._assign_lock.release()
        yield pb.AssignProgress(loaded_bytes=self.stages.nbytes, total_bytes=self.stages.nbytes,
                                layers_done=layers, layers_total=layers, done=True, epoch=epoch)

    def _loading(self, load: Callable, layers_total: int) -> Iterator[pb.AssignProgress]:
        """Run ``load(progress)`` on the worker, yielding its ``AssignProgress`` as it goes."""
        updates: queue.SimpleQueue = queue.SimpleQueue()

        def progress(loaded, total, done):
            updates.put(pb.AssignProgress(loaded_bytes=loaded, total_bytes=total,
                                          layers_done=done, layers_total=layers_total))

        loading = self.worker.submit(load, progress)
        loading.add_done_callback(lambda _: updates.put(None))
        try:
            while (update := updates.get()) is not None:
                yield update
        finally:  # also when the caller goes away: the store is ours until it is done
            futures.wait([loading])
        loading.result()

    def measure(self, request: pb.MeasureRequest, peer: str = "") -> pb.Measurement:
        """Time one whole decoder layer (the cost model's probe)."""
        if not 0 <= request.context <= MAX_MEASURE_CONTEXT:
            raise InvalidRequestError(f"context must be 0 to {MAX_MEASURE_CONTEXT} tokens, not {request.context}")
        epoch = self.claim(request.router, peer)
        self._lock_loading()  # it loads a layer: not beside an assignment
        try:
            b1, b8, nbytes = self.worker.run(self.stages.measure, request.layer, request.context or 32)
        finally:
            self._assign_lock.release()
        return pb.Measurement(layer_seconds_batch1=b1, layer_seconds_batch8=b8, layer_bytes=nbytes, epoch=epoch)

    # --- the Forward exchange -------------------------------------------------------
    def forward(self, req: pb.ForwardRequest) -> pb.ForwardResponse:
        """Answer one request, by its operation, on a thread allowed to use mlx.

        Raises:
            InvalidRequestError: no operation, malformed tensors, NaN or inf, or layers/experts not held.
        """
        return wire.materialized(self.forward_framed(req))

    def forward_framed(self, req: pb.ForwardRequest) -> "pb.ForwardResponse | wire.Framed":
        """``forward``, with a large output left as a ``wire.Framed`` tail (the
        data plane sends it from the output's memory)."""
        start = time.perf_counter()
        op = req.WhichOneof("op")
        if op == "expert":
            return self._experts(req, start)
        if op == "stage":
            return self._stage(req, start)
        if op == "release":
            if len(req.release.sequences) > MAX_RELEASE:
                raise InvalidRequestError(f"a release names at most {MAX_RELEASE} sequences, "
                                          f"not {len(req.release.sequences)}")
            self.stages.release(req.release.sequences)
        elif op != "ping":
            raise InvalidRequestError("the request names no operation (expert, stage, release or ping)")
        return pb.ForwardResponse(request_id=req.request_id, compute_seconds=time.perf_counter() - start)

    def _experts(self, req: pb.ForwardRequest, start: float) -> pb.ForwardResponse:
        e = req.expert
        if e.expert_ids.dtype != pb.INT32:
            raise InvalidRequestError("expert_ids must be INT32")
        if e.weights.dtype != pb.FLOAT32:
            raise InvalidRequestError("weights must be FLOAT32")
        if e.hidden.dtype not in _HIDDEN_DTYPES:
            raise InvalidRequestError("hidden must be FLOAT32, FLOAT16 or BFLOAT16")
        hidden = wire.decode_numpy(e.hidden, "hidden")
        if not wire.all_finite(hidden, e.hidden.dtype):
            raise InvalidRequestError("hidden contains NaN or inf")
        ids = wire.decode_numpy(e.expert_ids, "expert_ids")
        weights = wire.decode_numpy(e.weights, "weights")
        self.stages.halt()  # nothing of this runs behind a stage step waiting for its request
        out = self.store.forward_wire(e.layer, hidden, e.hidden.dtype, ids, weights, self._staging())
        # evaluated before this thread's next request reuses its staging; the read is sent before its next one
        host = wire.read_back([out])[0].reshape(out.shape)
        resp = wire.framed_tensor(pb.ForwardResponse(request_id=req.request_id), ("output",), host,
                                  wire.wire_dtype(out.dtype))
        return self._counted(resp, e.hidden.shape[0], start)

    def _stage(self, req: pb.ForwardRequest, start: float) -> pb.ForwardResponse:
        stage = req.stage
        if max(len(stage.sequences), len(stage.right_padding)) > MAX_STEP_SEQUENCES:
            raise InvalidRequestError(f"a stage step has at most {MAX_STEP_SEQUENCES} rows")
        if stage.hidden.dtype not in _HIDDEN_DTYPES:
            raise InvalidRequestError("hidden must be FLOAT32, FLOAT16 or BFLOAT16")
        # a fresh array unless the step was built ahead, not this thread's staging: on the H200 a 6-layer span's
        # step took 2,312 µs fed a fresh one against 2,549 staged (benchmarks/spanbuild.py,
        # results/spanbuild-20261201-s5-d-worker.json)
        hidden = wire.decode_numpy(stage.hidden, "hidden")
        out, code, routing = self.stages.forward(stage.layer, hidden, list(stage.sequences),
                                                 list(stage.right_padding), stage.trim, stage.hidden.dtype)
        self._local.stage = stage.layer
        resp = wire.framed_tensor(pb.ForwardResponse(request_id=req.request_id, routing=routing), ("output",),
                                  out, code)
        return self._counted(resp, out.shape[0] * out.shape[1], start)

    def after_reply(self) -> None:
        """The reply to this thread's last request went out: build its span's
        next decode step ahead (``StageStore.prebuild``), if it was a stage
        request. Never raises: a failure here costs only the head start."""
        start, self._local.stage = getattr(self._local, "stage", None), None
        if start is None:
            return
        try:
            self.stages.prebuild(start)
        except Exception:  # noqa: BLE001 the step is then built when it comes
            logger.exception("building the next decode step of the span at layer %d ahead failed", start)

    def _counted(self, resp: "pb.ForwardResponse | wire.Framed", tokens: int, start: float):
        """``resp``, with its compute time, counted in the node's stats (its
        bytes are counted by the transport: ``count_bytes``)."""
        message = resp.message if isinstance(resp, wire.Framed) else resp
        message.compute_seconds = seconds = time.perf_counter() - start
        with self._stats_lock:
            s = self.stats
            s.forward_requests += 1
            s.forward_tokens += tokens
            s.compute_seconds += seconds
            self.compute.observe(seconds)
        return resp

    def count_bytes(self, received: int, sent: int) -> None:
        """One Forward exchange's traffic: the request's bytes and the reply's."""
        with self._stats_lock:
            self.stats.bytes_received += received
            self.stats.bytes_sent += sent

    def snapshot(self) -> tuple[pb.NodeStats, pb.Histogram]:
        """The Forward counters and the compute-time histogram, consistently."""
        with self._stats_lock:
            stats = pb.NodeStats.FromString(self.stats.SerializeToString())
            compute = self.compute.to_message()
        counts = self.stages.prelaunch_counts
        stats.prelaunch_answered, stats.prelaunch_gave_up, stats.prelaunch_let_go = \
            counts.answered, counts.gave_up, counts.let_go
        return stats, compute
