"""The lab's Kubernetes API server (see README.md in this directory)."""
from .server import LabApiServer
from .store import ApiError, Store

__all__ = ["LabApiServer", "Store", "ApiError"]
