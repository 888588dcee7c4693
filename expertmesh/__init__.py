"""expertmesh: spread the experts of an MLX Mixture-of-Experts model over several machines."""

__version__ = "0.1.0"

import os as _os

# Installed, nodes/ and discovery/ are subpackages (pyproject's package-dir);
# in a clone they sit beside this folder: imported from one (tests, `make
# demo`), look for them there too.
_clone = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "nodes")) and _os.path.isfile(_os.path.join(_clone, "nodes", "daemon.py")):
    __path__.append(_clone)
del _os, _clone

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
