"""ExpertService servicer: messages in, store calls, messages out."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
import mlx.core as mx

from expertmesh import __version__, wire
from expertmesh.errors import ExpertmeshError, InvalidRequestError, OwnershipError, abort, status_code
from expertmesh.metrics import Histogram
from expertmesh.serving import PROTOCOL_VERSION, layer_experts
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc
from expertmesh.worker import MLXWorker
from expertmesh.nodes.stages import StageStore
from expertmesh.nodes.store import ExpertStore

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the router id of a caller that gives none

# Measure times one layer after this many tokens at most: its KV stays small
MAX_MEASURE_CONTEXT = 4096

class ExpertServicer(pb_grpc.ExpertServiceServicer):
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

    @property
    def state(self) -> int:
        return self._state

    @state.setter
    def state(self, state: int) -> None:
        self._state = state
        self.on_state_change()

    def GetInfo(self, request, context):
        return self.info()

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
    def _claim(self, router: pb.RouterIdentity, context) -> int:
        """Serve ``router`` from now on, unless another holds this node and it
        does not take over; returns the epoch of its hold."""
        if not router.id:  # a tool (grpcurl, a test) that names no router holds the node as one
            router = pb.RouterIdentity(id=ANONYMOUS, address=context.peer(), takeover=router.takeover)
        with self._router_lock:
            holder = self.router
            if holder.id not in ("", ANONYMOUS, router.id) and not router.takeover:  # tools hold no node from routers
                abort(context, OwnershipError(
                    f"node {self.name} serves router {holder.id[:8]} at {holder.address}: stop that router, or "
                    f"start this one with --takeover to take the node from it"))
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

    def Release(self, request, context):
        with self._router_lock:
            released = bool(request.router_id) and request.router_id == self.router.id and request.epoch == self.epoch
            if released:
                self.router = pb.RouterIdentity()
        if released:
            logger.info("router %s released node %s", request.router_id[:8], self.name)
            self._drop_router_state()
        return pb.ReleaseReply()

    def _check_checkpoint(self, request, context) -> None:
        ck = self.store.checkpoint
        if request.config_hash != ck.config_hash:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name} serves {ck.model_id} (config {ck.config_hash}), not config {request.config_hash}")
        if request.weights_hash and request.weights_hash != ck.identity.weights:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} serves {ck.model_id}; the router "
                          f"has {ck.identity.difference(request.config_hash, request.weights_hash, 'this node')}")

    def _check_budget(self, need: int, what: str, context) -> None:
        if need > self.memory_budget:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {self.name}: {what} {need / 1e9:.2f} GB, budget is {self.memory_budget / 1e9:.2f} GB")

    def _lock_loading(self, context) -> None:
        """Take the one loading slot (Assign, AssignStages, Measure) or abort; the caller releases it."""
        if not self._assign_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.ABORTED, f"node {self.name} is already loading an assignment")

    def Assign(self, request, context):
        self._check_checkpoint(request, context)
        epoch = self._claim(request.router, context)
        wanted = {le.layer: list(le.experts) for le in request.experts}
        if len(wanted) != len(request.experts):
            layers = [le.layer for le in request.experts]
            twice = next(l for l in layers if layers.count(l) > 1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layer {twice} is listed more than once")
        try:
            self.store.validate_assignment(wanted)
        except ExpertmeshError as e:
            context.abort(status_code(e), str(e))
        need = sum(self.store.expert_bytes(l) * len(e) for l, e in wanted.items()) + self.stages.nbytes
        self._check_budget(need, "assignment needs", context)
        self._lock_loading(context)
        try:
            self.state = pb.LOADING
            layers_total = len(wanted)
            yield from self._loading(lambda progress: self.store.assign(wanted, progress), layers_total)
            self.state = pb.READY
            yield pb.AssignProgress(loaded_bytes=self.store.nbytes, total_bytes=self.store.nbytes,
                                    layers_done=layers_total, layers_total=layers_total, done=True, epoch=epoch)
        except ExpertmeshError as e:
            self.state = pb.IDLE
            context.abort(status_code(e), str(e))
        finally:
            self._assign_lock.release()

    def _loading(self, load: Callable, layers_total: int):
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

    def Forward(self, request_iterator, context):
        for req in request_iterator:
            try:
                resp = self.worker.run(self.forward, req)
            except ExpertmeshError as e:
                context.abort(status_code(e), f"request {req.request_id}: {e}")
            yield resp

    def forward(self, req: pb.ForwardRequest) -> pb.ForwardResponse:
        """One Forward request, on a thread allowed to use mlx.

        Raises:
            InvalidRequestError: malformed tensors, NaN or inf, or layers/experts not held.
        """
        start = time.perf_counter()
        if req.HasField("stage"):
            return self._stage(req, start)
        if req.expert_ids.dtype != pb.INT32:
            raise InvalidRequestError("expert_ids must be INT32")
        if req.weights.dtype != pb.FLOAT32:
            raise InvalidRequestError("weights must be FLOAT32")
        if req.hidden.dtype not in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16):
            raise InvalidRequestError("hidden must be FLOAT32, FLOAT16 or BFLOAT16")
        hidden = wire.decode_numpy(req.hidden, "hidden")
        if not wire.all_finite(hidden, req.hidden.dtype):
            raise InvalidRequestError("hidden contains NaN or inf")
        ids = wire.decode_numpy(req.expert_ids, "expert_ids")
        weights = wire.decode_numpy(req.weights, "weights")
        out = self.store.forward_wire(req.layer, hidden, req.hidden.dtype, ids, weights)
        mx.eval(out)
        resp = pb.ForwardResponse(request_id=req.request_id, output=wire.encode(out))
        return self._counted(req, resp, req.hidden.shape[0], start)

    def _counted(self, req: pb.ForwardRequest, resp: pb.ForwardResponse, tokens: int, start: float):
        """``resp``, with its compute time, counted in the node's stats."""
        resp.compute_seconds = time.perf_counter() - start
        with self._stats_lock:
            s = self.stats
            s.forward_requests += 1
            s.forward_tokens += tokens
            s.bytes_received += req.ByteSize()
            s.bytes_sent += resp.ByteSize()
            s.compute_seconds += resp.compute_seconds
            self.compute.observe(resp.compute_seconds)
        return resp

    # --- pipeline stages (nodes/stages.py) ------------------------------------
    def AssignStages(self, request, context):
        self._check_checkpoint(request, context)
        epoch = self._claim(request.router, context)
        spans = [(s.start, s.end) for s in request.stages]
        try:
            self.stages.validate(spans)
        except ExpertmeshError as e:
            context.abort(status_code(e), str(e))
        self._check_budget(self.stages.span_bytes(spans) + self.store.nbytes, "stages and experts need", context)
        self._lock_loading(context)
        try:
            layers = sum(b - a for a, b in spans)
            yield from self._loading(lambda progress: self.stages.assign(spans, progress), layers)
        except ExpertmeshError as e:
            context.abort(status_code(e), str(e))
        finally:
            self._assign_lock.release()
        yield pb.AssignProgress(loaded_bytes=self.stages.nbytes, total_bytes=self.stages.nbytes,
                                layers_done=layers, layers_total=layers, done=True, epoch=epoch)

    def Measure(self, request, context):
        if not 0 <= request.context <= MAX_MEASURE_CONTEXT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"context must be 0 to {MAX_MEASURE_CONTEXT} tokens, not {request.context}")
        epoch = self._claim(request.router, context)
        self._lock_loading(context)  # it loads a layer: not beside an assignment
        try:
            b1, b8, nbytes = self.worker.run(self.stages.measure, request.layer, request.context or 32)
        except ExpertmeshError as e:
            context.abort(status_code(e), str(e))
        finally:
            self._assign_lock.release()
        return pb.Measurement(layer_seconds_batch1=b1, layer_seconds_batch8=b8, layer_bytes=nbytes, epoch=epoch)

    def _stage(self, req: pb.ForwardRequest, start: float) -> pb.ForwardResponse:
        stage = req.stage
        if stage.release:
            self.stages.release(stage.release)
        resp = pb.ForwardResponse(request_id=req.request_id)
        if req.HasField("hidden"):
            if req.hidden.dtype not in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16):
                raise InvalidRequestError("hidden must be FLOAT32, FLOAT16 or BFLOAT16")
            out, routing = self.stages.forward(req.layer, wire.decode(req.hidden, "hidden"),
                                               list(stage.sequences), list(stage.right_padding), stage.trim)
            resp.output.CopyFrom(wire.encode(out))
            resp.routing.CopyFrom(routing)
            return self._counted(req, resp, out.shape[0] * out.shape[1], start)
        resp.compute_seconds = time.perf_counter() - start
        return resp

    def GetStats(self, request, context):
        return self.snapshot()[0]

    def snapshot(self) -> tuple[pb.NodeStats, pb.Histogram]:
        """The Forward counters and the compute-time histogram, consistently."""
        with self._stats_lock:
            return pb.NodeStats.FromString(self.stats.SerializeToString()), self.compute.to_message()
