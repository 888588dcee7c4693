"""The router: the dense model, a plan, and one Forward stream per node."""

from .router import Router, RouterConfig

__all__ = ["Router", "RouterConfig"]
