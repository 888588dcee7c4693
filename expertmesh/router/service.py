"""InferenceService servicer: messages in, Router calls, messages out."""

from __future__ import annotations

import logging

from ..errors import ExpertmeshError, abort
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, router):
        self.router = router

    def Generate(self, request, context):
        seed = request.seed if request.HasField("seed") else None
        try:
            for r in self.router.generate(request.prompt, max_tokens=request.max_tokens or None,
                                          temperature=request.temperature, top_p=request.top_p,
                                          seed=seed, is_active=context.is_active):
                yield pb.GenerateResponse(
                    text=r.text, token=r.token, finish_reason=r.finish_reason or "",
                    prompt_tokens=r.prompt_tokens, generation_tokens=r.generation_tokens,
                    generation_tps=r.generation_tps)
        except ExpertmeshError as e:
            logger.warning("Generate failed: %s", e)
            abort(context, e)

    def GetCluster(self, request, context):
        return self.router.cluster()
