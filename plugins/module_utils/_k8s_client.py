# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The one Kubernetes client factory of the collection, with bounded retries and one error family.

``K8sClient(params)`` builds an ``ApiClient`` from the shared auth options (AUTH_ARG_SPEC):
explicit options win over the kubeconfig, which falls back to ``~/.kube/config`` and then the
in-cluster service account. ``client.call(fn, *args, **kwargs)`` runs one API call with a
request timeout, retries HTTP 429 (honouring Retry-After), 5xx and dropped connections with
exponential backoff, and turns every failure into :class:`K8sError` naming the call.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import os
import time
import traceback
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, TypeVar

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    InvalidOptionError,
    K8sError,
    K8sForbiddenError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module

try:
    import kubernetes
    from kubernetes.client.rest import ApiException
    from kubernetes.config.config_exception import ConfigException
except ImportError:
    HAS_KUBERNETES = False
    KUBERNETES_IMPORT_ERROR: Optional[str] = traceback.format_exc()

    class ApiException(Exception):  # type: ignore[no-redef]
        """Stand-in so ``except ApiException`` parses without the library."""

    class ConfigException(Exception):  # type: ignore[no-redef]
        """Stand-in so ``except ConfigException`` parses without the library."""
else:
    HAS_KUBERNETES = True
    KUBERNETES_IMPORT_ERROR = None

try:
    from yaml import YAMLError
except ImportError:  # PyYAML comes with kubernetes
    class YAMLError(Exception):  # type: ignore[no-redef]
        """Stand-in."""

try:
    from urllib3.exceptions import HTTPError as Urllib3Error
except ImportError:  # urllib3 comes with kubernetes; without it nothing here runs anyway
    class Urllib3Error(Exception):  # type: ignore[no-redef]
        """Stand-in."""

T = TypeVar("T")

RETRYABLE_STATUS = (429, 500, 502, 503, 504)
MAX_BACKOFF_S = 8.0


def _status_message(exc: ApiException) -> str:
    """The ``message`` of a Kubernetes Status body, else the HTTP reason."""
    body = getattr(exc, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body)
        except (ValueError, AttributeError):
            return str(body)[:300]
    return str(getattr(exc, "reason", "") or exc)


def _retry_after(exc: ApiException) -> Optional[float]:
    headers = getattr(exc, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def build_configuration(params: Dict[str, Any]) -> Any:
    """A ``kubernetes.client.Configuration`` from the shared auth options."""
    kubeconfig = params.get("kubeconfig")
    context = params.get("context")
    configuration = kubernetes.client.Configuration()
    explicit = params.get("host") and (params.get("api_key") or params.get("username")
                                       or params.get("client_cert"))
    if not explicit:
        try:
            if isinstance(kubeconfig, dict):
                kubernetes.config.load_kube_config_from_dict(
                    kubeconfig, context=context, client_configuration=configuration)
            elif kubeconfig:
                path = os.path.expanduser(str(kubeconfig))
                if not os.path.isfile(path):
                    raise InvalidOptionError(
                        "kubeconfig %s: no such file" % path,
                        action="pass the path of a readable kubeconfig (option kubeconfig or K8S_AUTH_KUBECONFIG)")
                kubernetes.config.load_kube_config(
                    config_file=path, context=context, client_configuration=configuration)
            elif os.path.isfile(os.path.expanduser("~/.kube/config")):
                kubernetes.config.load_kube_config(context=context, client_configuration=configuration)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            elif not params.get("host"):
                raise InvalidOptionError(
                    "no Kubernetes API to talk to: no kubeconfig given, no ~/.kube/config, not in a pod",
                    action="set kubeconfig (or K8S_AUTH_KUBECONFIG), or host with api_key")
        except ConfigException as exc:
            raise InvalidOptionError("kubeconfig %s: %s" % (kubeconfig or "~/.kube/config", exc),
                                     action="check the kubeconfig file and the context name")
        except (ValueError, TypeError, KeyError, YAMLError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise InvalidOptionError("kubeconfig %s is malformed: %s" % (kubeconfig or "~/.kube/config", reason),
                                     action="check that the file is a kubeconfig (YAML with clusters, users, contexts)")
    if params.get("host"):
        configuration.host = params["host"].rstrip("/")
    if params.get("api_key"):
        # the key name changed across client releases ("authorization", then "BearerToken")
        token = "Bearer " + params["api_key"]
        configuration.api_key = {"authorization": token, "BearerToken": token}
    if params.get("username"):
        configuration.username = params["username"]
        configuration.password = params.get("password") or ""
    if params.get("validate_certs") is not None:
        configuration.verify_ssl = params["validate_certs"]
    for option, attribute in (("ca_cert", "ssl_ca_cert"), ("client_cert", "cert_file"),
                              ("client_key", "key_file")):
        if params.get(option):
            if not os.path.isfile(params[option]):
                raise InvalidOptionError("%s %s: no such file" % (option, params[option]))
            setattr(configuration, attribute, params[option])
    if params.get("proxy"):
        configuration.proxy = params["proxy"]
    # K8sClient.call retries (bounded by api_retries, with backoff): urllib3 inside the client must
    # not retry as well, or one call becomes up to 4 requests per attempt on the wire
    configuration.retries = False
    return configuration


class K8sClient:
    """An API client built from the shared auth options, with bounded retries."""

    def __init__(self, params: Dict[str, Any], sleep: Callable[[float], None] = time.sleep) -> None:
        if not HAS_KUBERNETES:
            raise K8sError("the Python library kubernetes is not installed", traceback=KUBERNETES_IMPORT_ERROR)
        timeout = params.get("request_timeout")
        retries = params.get("api_retries")
        if timeout is not None and timeout <= 0:
            raise InvalidOptionError("request_timeout must be greater than 0, got %s" % timeout)
        if retries is not None and retries < 0:
            raise InvalidOptionError("api_retries must be 0 or more, got %s" % retries)
        self.request_timeout = float(timeout or 20)
        self.retries = 4 if retries is None else int(retries)
        self.configuration = build_configuration(params)
        self.api_client = kubernetes.client.ApiClient(self.configuration)
        self._sleep = sleep
        self.requests = 0  # API calls made, retries included (for reports and benchmarks)

    def request(self, method: str, path: str, query: Optional[Sequence[Tuple[str, Any]]] = None,
                body: Any = None, _request_timeout: Any = None, _preload_content: bool = False) -> Any:
        """One request through the ApiClient (authentication, TLS, proxy as configured), a JSON
        body when given, returning the undecoded response (``decode_response`` reads it); a
        status outside 2xx raises ApiException, as the typed calls do. Use it with ``call``.

        The typed API classes are not imported: ``CoreV1Api`` and ``AppsV1Api`` alone cost about
        0.7 s of CPU per module run with kubernetes 37, more than a fleet read or a Lease update.
        Works with both shapes of the client: ``param_serialize`` + ``call_api(method, url)``
        (newer releases) and ``call_api(path, method, ...)`` (kubernetes 29 and 30).
        """
        del _preload_content  # always raw: call_json decodes the body itself
        api = self.api_client
        headers = {"Accept": "application/json, */*"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        params = [(key, value) for key, value in (query or ()) if value is not None]
        if hasattr(api, "param_serialize"):
            method, url, headers, body, post = api.param_serialize(
                method=method, resource_path=path, query_params=params, header_params=headers, body=body,
                auth_settings=["BearerToken"])
            response = api.call_api(method, url, header_params=headers, body=body, post_params=post,
                                    _request_timeout=_request_timeout)
            response.read()
            if not 200 <= int(response.status) <= 299:
                raise ApiException(http_resp=response)
            return response
        return api.call_api(path, method, query_params=params, header_params=headers, body=body,
                            auth_settings=["BearerToken"], _return_http_data_only=True, _preload_content=False,
                            _request_timeout=_request_timeout)

    @property
    def core(self) -> Any:
        return kubernetes.client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> Any:
        return kubernetes.client.AppsV1Api(self.api_client)

    @property
    def coordination(self) -> Any:
        return kubernetes.client.CoordinationV1Api(self.api_client)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` with a request timeout and bounded retries.

        ``what`` names the call in the operator's words ("list nodes", "patch node gpu-07"):
        it leads every error message.
        """
        kwargs.setdefault("_request_timeout", self.request_timeout)
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                status = getattr(exc, "status", None) or 0
                if status in RETRYABLE_STATUS and attempt <= self.retries:
                    self._sleep(min(_retry_after(exc) or 0.2 * 2 ** (attempt - 1), MAX_BACKOFF_S))
                    continue
                raise self._translate(what, exc, attempt)
            except (Urllib3Error, OSError) as exc:
                if attempt <= self.retries:
                    self._sleep(min(0.2 * 2 ** (attempt - 1), MAX_BACKOFF_S))
                    continue
                raise K8sError("%s: cannot reach the Kubernetes API at %s after %d attempts: %s"
                               % (what, self.configuration.host, attempt, exc),
                               action="check that the API server is reachable from here (host, proxy, network)")

    def _translate(self, what: str, exc: ApiException, attempt: int) -> K8sError:
        status = getattr(exc, "status", None) or 0
        message = _status_message(exc)
        if status == 0:  # no HTTP answer at all: TLS refused the server, or the connection failed
            return K8sError("%s: cannot reach the Kubernetes API at %s: %s" % (what, self.configuration.host, message),
                            action="check the API address and its TLS trust: ca_cert / validate_certs or the "
                                   "kubeconfig's certificate-authority (an expired or foreign certificate fails here)")
        if status == 401:
            return K8sError("%s: unauthorized (HTTP 401): the API rejected the credentials" % what,
                            action="check api_key / the kubeconfig user, the token may be wrong or expired",
                            status=status)
        if status == 403:
            return K8sForbiddenError("%s: forbidden: %s" % (what, message),
                                     action="grant the automation identity this rule (see docs/rbac.yaml)",
                                     status=status)
        if status in RETRYABLE_STATUS:
            return K8sError("%s: the API answered HTTP %s after %d attempts: %s" % (what, status, attempt, message),
                            action="retry later; the API server is overloaded or failing", status=status)
        return K8sError("%s: HTTP %s: %s" % (what, status, message), status=status)


def is_not_found(error: Exception) -> bool:
    return getattr(error, "details", {}).get("status") == 404 or getattr(error, "status", None) == 404


def run_api_module(module: Any, body: Callable[[K8sClient], Dict[str, Any]]) -> None:
    """The body of an API module: the kubernetes library present, one client from the shared auth
    options, the result's ``diff`` only with ``--diff``, errors turned into fail_json."""
    require_library(module, "kubernetes", HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR)

    def run() -> Dict[str, Any]:
        result = body(K8sClient(module.params))
        if not module._diff:
            result.pop("diff", None)
        return result

    run_module(module, run)
