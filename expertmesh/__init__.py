"""expertmesh: spread the experts of an MLX Mixture-of-Experts model over several machines."""

__version__ = "0.1.0"

from .client import Client, ClusterView, NodeView, Piece
from .errors import (
    AuthError,
    ConfigMismatchError,
    DiscoveryError,
    ExpertmeshError,
    InvalidRequestError,
    ModelError,
    OverloadedError,
    OwnershipError,
    PlacementError,
    RequestTooLargeError,
    UnavailableError,
)
from .options import GenerationOptions

__all__ = [
    "AuthError",
    "Client",
    "ClusterView",
    "ConfigMismatchError",
    "DiscoveryError",
    "ExpertmeshError",
    "GenerationOptions",
    "InvalidRequestError",
    "ModelError",
    "NodeView",
    "OverloadedError",
    "OwnershipError",
    "PlacementError",
    "Piece",
    "RequestTooLargeError",
    "UnavailableError",
    "__version__",
]
