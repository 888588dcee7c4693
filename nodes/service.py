"""ExpertService servicer: gRPC messages in, ``NodeCore`` calls, messages out.

It only translates: every decision is the core's (``core.py``), and each
``ExpertmeshError`` the core raises ends the call with its status code.
"""

from __future__ import annotations

import logging

from expertmesh.errors import ExpertmeshError, abort, status_code
from expertmesh.nodes.core import NodeCore
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(self, core: NodeCore):
        self.core = core

    def GetInfo(self, request, context):
        return self.core.info()

    def GetStats(self, request, context):
        return self.core.snapshot()[0]

    def Release(self, request, context):
        self.core.release(request.router_id, request.epoch)
        return pb.ReleaseReply()

    def Assign(self, request, context):
        yield from self._streamed(self.core.assign(request, context.peer()), context)

    def AssignStages(self, request, context):
        yield from self._streamed(self.core.assign_stages(request, context.peer()), context)

    @staticmethod
    def _streamed(updates, context):
        try:
            yield from updates
        except ExpertmeshError as e:
            abort(context, e)

    def Measure(self, request, context):
        try:
            return self.core.measure(request, context.peer())
        except ExpertmeshError as e:
            abort(context, e)

    def Forward(self, request_iterator, context):
        """The Forward exchange over gRPC (tools, and nodes' fallback): the
        first failed request ends the stream with its status."""
        for req in request_iterator:
            try:
                resp = self.core.worker.run(self.core.forward, req)
            except ExpertmeshError as e:
                context.abort(status_code(e), f"request {req.request_id}: {e}")
            self.core.count_bytes(req.ByteSize(), resp.ByteSize())
            yield resp
