"""Dispatch: an agent-native compute network for small jobs, protocol-first over gRPC."""

__version__ = "0.1.0"
