"""The lab's Kubernetes API server (see README.md in this directory)."""
from .rbac import rules_from_rbac_documents, rules_from_rbac_yaml, service_account_user
from .server import LabApiServer
from .store import ApiError, Store

__all__ = ["LabApiServer", "Store", "ApiError", "rules_from_rbac_yaml", "rules_from_rbac_documents",
           "service_account_user"]
