"""The node daemon: holds some routed experts and serves ``ExpertService``."""

from expertmesh.nodes.daemon import Node, NodeConfig

__all__ = ["Node", "NodeConfig"]
