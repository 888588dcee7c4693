"""InferenceService servicer: messages in, Router calls, messages out."""

from __future__ import annotations

import logging
import queue
import threading

from google.protobuf import json_format

from ..errors import ExpertmeshError, InvalidRequestError, abort
from ..options import GenerationOptions
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, router):
        self.router = router

    def Generate(self, request, context):
        return self._stream("Generate", context, self.router.generate, request.prompt,
                            options=GenerationOptions.from_message(request), is_active=context.is_active)

    def Chat(self, request, context):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        kwargs = json_format.MessageToDict(request.chat_template_kwargs) if request.HasField("chat_template_kwargs") else None
        return self._stream("Chat", context, self.router.chat, messages, options=GenerationOptions.from_message(request),
                            chat_template_kwargs=kwargs, is_active=context.is_active)

    def _stream(self, method, context, start, *args, **kw):
        try:
            for r in start(*args, **kw):
                yield pb.GenerateResponse(
                    text=r.text, token=r.token, finish_reason=r.finish_reason or "",
                    prompt_tokens=r.prompt_tokens, generation_tokens=r.generation_tokens,
                    generation_tps=r.generation_tps)
        except ExpertmeshError as e:
            logger.warning("%s failed: %s", method, e)
            abort(context, e)

    def GetCluster(self, request, context):
        return self.router.cluster()

    def GetStats(self, request, context):
        return self.router.stats(reset=request.reset)

    def Rebalance(self, request, context):
        """Streams the rebalance's steps; it runs on a thread of its own, so a
        caller that goes away does not stop it half-way."""
        if not 0 <= request.threshold <= 1:
            abort(context, InvalidRequestError(f"threshold must be in [0, 1], not {request.threshold:g}"))
        updates: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            try:
                self.router.rebalance(updates.put, dry_run=request.dry_run, threshold=request.threshold,
                                      min_tokens=request.min_tokens)
                updates.put(None)
            except ExpertmeshError as e:
                updates.put(e)
            except Exception as e:  # the caller must hear of it, never wait forever
                logger.exception("Rebalance failed")
                updates.put(ExpertmeshError(f"rebalancing failed: {e}"))

        threading.Thread(target=work, name="rebalance-rpc", daemon=True).start()
        while (item := updates.get()) is not None:
            if isinstance(item, ExpertmeshError):
                logger.warning("Rebalance failed: %s", item)
                abort(context, item)
            yield item
