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

from .. import __version__, wire
from ..errors import ExpertmeshError, InvalidRequestError, status_code
from ..metrics import Histogram
from ..serving import PROTOCOL_VERSION, layer_experts
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from ..worker import MLXWorker
from .stages import StageStore
from .store import ExpertStore

logger = logging.getLogger(__name__)

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
        ck = self.store.checkpoint
        return pb.NodeInfo(
            name=self.name, version=__version__, protocol_version=PROTOCOL_VERSION,
            model_id=ck.model_id, config_hash=ck.config_hash,
            memory_budget_bytes=self.memory_budget, memory_used_bytes=self.store.nbytes + self.stages.nbytes,
            state=self.state, held=layer_experts(self.store.held()), data_port=self.data_port,
            token_required=self.token_required,
            stages=[pb.LayerSpan(start=s.start, end=s.end) for s in self.stages.spans.values()],
            kv_cache_bytes=self.stages.kv_bytes, kv_sequences=len(self.stages.sequences),
        )

    def _check_checkpoint(self, config_hash: str, context) -> None:
        ck = self.store.checkpoint
        if config_hash != ck.config_hash:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name} serves {ck.model_id} (config {ck.config_hash}), not config {config_hash}")

    def _check_budget(self, need: int, what: str, context) -> None:
        if need > self.memory_budget:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {self.name}: {what} {need / 1e9:.2f} GB, budget is {self.memory_budget / 1e9:.2f} GB")

    def _lock_loading(self, context) -> None:
        """Take the one loading slot (Assign, AssignStages, Measure) or abort; the caller releases it."""
        if not self._assign_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.ABORTED, f"node {self.name} is already loading an assignment")

    def Assign(self, request, context):
        self._check_checkpoint(request.config_hash, context)
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
                                    layers_done=layers_total, layers_total=layers_total, done=True)
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
        hidden = wire.from_numpy(hidden, req.hidden.dtype)
        ids = wire.decode_numpy(req.expert_ids, "expert_ids")
        weights = wire.decode_numpy(req.weights, "weights")
        out = self.store.forward(req.layer, hidden, ids, weights)
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
        self._check_checkpoint(request.config_hash, context)
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
                                layers_done=layers, layers_total=layers, done=True)

    def Measure(self, request, context):
        if not 0 <= request.context <= MAX_MEASURE_CONTEXT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"context must be 0 to {MAX_MEASURE_CONTEXT} tokens, not {request.context}")
        self._lock_loading(context)  # it loads a layer: not beside an assignment
        try:
            b1, b8, nbytes = self.worker.run(self.stages.measure, request.layer, request.context or 32)
        except ExpertmeshError as e:
            context.abort(status_code(e), str(e))
        finally:
            self._assign_lock.release()
        return pb.Measurement(layer_seconds_batch1=b1, layer_seconds_batch8=b8, layer_bytes=nbytes)

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
