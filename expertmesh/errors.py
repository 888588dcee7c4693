"""Errors expertmesh raises.

    ExpertmeshError                 base of everything below
    ├── ModelError                  checkpoint missing, unreadable or unsupported
    ├── ConfigMismatchError         a node serves another checkpoint than the router
    ├── OwnershipError              a node serves another router (FAILED_PRECONDITION)
    ├── PlacementError              the experts do not fit the nodes' memory
    ├── InvalidRequestError         bad input to an RPC (INVALID_ARGUMENT)
    ├── RequestTooLargeError        input over a size limit (RESOURCE_EXHAUSTED)
    ├── OverloadedError             the router runs and queues all it can (RESOURCE_EXHAUSTED)
    ├── AuthError                   missing or wrong credentials (UNAUTHENTICATED)
    ├── BusyError                   a node is already loading an assignment (ABORTED)
    ├── DiscoveryError              mDNS cannot run on the chosen interfaces
    └── UnavailableError            a router or node cannot be reached / went down

gRPC status codes map to these in one place, ``from_rpc_error``.
"""

from __future__ import annotations

import grpc


class ExpertmeshError(Exception):
    """Base class of all expertmesh errors."""


class ModelError(ExpertmeshError):
    """The checkpoint does not exist, cannot be read, or is not a supported MoE."""


class ConfigMismatchError(ExpertmeshError):
    """A node was started with a different checkpoint than the router."""


class OwnershipError(ExpertmeshError):
    """A node serves another router; it can be taken over only explicitly."""


class PlacementError(ExpertmeshError):
    """The experts cannot be placed within the nodes' memory budgets."""


class InvalidRequestError(ExpertmeshError):
    """A request was malformed: wrong shape, dtype, id, or a prompt too long.

    ``param`` names the request field at fault and ``code`` says why in one
    word (``"context_length_exceeded"``), where known; both may be None.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class RequestTooLargeError(InvalidRequestError):
    """A request exceeded a size limit."""


class OverloadedError(ExpertmeshError):
    """The router runs as many generations as it batches and queues as many as
    it may; try again later."""


class AuthError(ExpertmeshError):
    """Credentials were missing or wrong."""


class BusyError(ExpertmeshError):
    """A node is already loading an assignment; try again when it is done."""


class DiscoveryError(ExpertmeshError):
    """An ``--interface`` does not exist, or mDNS cannot start on it."""


class UnavailableError(ExpertmeshError):
    """A router or node could not be reached, or stopped answering."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RequestTooLargeError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.FAILED_PRECONDITION: ConfigMismatchError,
    grpc.StatusCode.ABORTED: BusyError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}

_TO_CODE = {
    RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    AuthError: grpc.StatusCode.UNAUTHENTICATED,
    BusyError: grpc.StatusCode.ABORTED,
    ConfigMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    OwnershipError: grpc.StatusCode.FAILED_PRECONDITION,
    PlacementError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


# Trailing metadata naming the error class, on errors a server raised itself
# (a node that is down, say), so clients do not take them for transport failures.
_RAISED = "expertmesh-error"
_CLASSES = {cls.__name__: cls for cls in _TO_CODE}


def abort(context: grpc.ServicerContext, err: ExpertmeshError) -> None:
    """End an RPC with ``err``: its status code, its message, its class."""
    context.set_trailing_metadata(((_RAISED, type(err).__name__),))
    context.abort(status_code(err), str(err))


def from_rpc_error(err: grpc.RpcError, target: str) -> ExpertmeshError:
    """Turn a failed call into the matching public error, naming the peer."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    raised = dict(err.trailing_metadata() or ()).get(_RAISED) if hasattr(err, "trailing_metadata") else None
    return from_status(code, details, target, raised)


def from_status(code: grpc.StatusCode | int | None, details: str, target: str,
                raised: str | None = None) -> ExpertmeshError:
    """The public error for a status (a StatusCode or its integer value).

    ``raised`` names the error class when the peer itself raised it (then the
    status is no transport failure); "" means raised by the peer, class unknown.
    """
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    cls = _BY_CODE.get(code, ExpertmeshError)
    if raised is not None:
        return _CLASSES.get(raised, cls)(details)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return cls(_WRONG_SERVER.get(target.split(" ")[0], "{target} does not serve this call ({details})")
                   .format(target=target, details=details))
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach {target}: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"{target} did not answer in time"
    return cls(details)


# an UNIMPLEMENTED method: the address is some other server, e.g. a node where a router was meant
_WRONG_SERVER = {
    "router": "{target} is not an expertmesh router ({details}): is it a node? Give the address that "
              "`expertmesh router` prints (listening on HOST:PORT)",
    "node": "{target} is not an expertmesh node ({details}): is it a router? --peer takes the addresses that "
            "`expertmesh node` prints (listening on HOST:PORT)",
}


def status_code(err: ExpertmeshError) -> grpc.StatusCode:
    """The gRPC status a server answers with for this error."""
    for cls in type(err).__mro__:
        if cls in _TO_CODE:
            return _TO_CODE[cls]
    return grpc.StatusCode.INTERNAL
