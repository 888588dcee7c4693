"""The node daemon: holds some routed experts and serves ``ExpertService``."""

from .daemon import Node, NodeConfig

__all__ = ["Node", "NodeConfig"]
