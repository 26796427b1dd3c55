# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Shared argument specs; each has a doc fragment of the same options
(AUTH_ARG_SPEC: plugins/doc_fragments/k8s_auth_options.py)."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from copy import deepcopy
from typing import Any, Dict

from ansible.module_utils.basic import env_fallback

AUTH_ARG_SPEC: Dict[str, Dict[str, Any]] = {
    "kubeconfig": {"type": "raw", "fallback": (env_fallback, ["K8S_AUTH_KUBECONFIG"])},
    "context": {"type": "str", "fallback": (env_fallback, ["K8S_AUTH_CONTEXT"])},
    "host": {"type": "str", "fallback": (env_fallback, ["K8S_AUTH_HOST"])},
    "api_key": {"type": "str", "no_log": True, "fallback": (env_fallback, ["K8S_AUTH_API_KEY"])},
    "username": {"type": "str", "fallback": (env_fallback, ["K8S_AUTH_USERNAME"])},
    "password": {"type": "str", "no_log": True, "fallback": (env_fallback, ["K8S_AUTH_PASSWORD"])},
    "validate_certs": {"type": "bool", "aliases": ["verify_ssl"],
                       "fallback": (env_fallback, ["K8S_AUTH_VERIFY_SSL"])},
    "ca_cert": {"type": "path", "aliases": ["ssl_ca_cert"],
                "fallback": (env_fallback, ["K8S_AUTH_SSL_CA_CERT"])},
    "client_cert": {"type": "path", "aliases": ["cert_file"],
                    "fallback": (env_fallback, ["K8S_AUTH_CERT_FILE"])},
    "client_key": {"type": "path", "aliases": ["key_file"], "no_log": False,
                   "fallback": (env_fallback, ["K8S_AUTH_KEY_FILE"])},
    "proxy": {"type": "str", "fallback": (env_fallback, ["K8S_AUTH_PROXY"])},
    "request_timeout": {"type": "float", "default": 20},
    "api_retries": {"type": "int", "default": 4},
}

AUTH_OPTION_NAMES = tuple(AUTH_ARG_SPEC)


def auth_argument_spec(extra: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """A module's arg spec: a copy of AUTH_ARG_SPEC updated with the module's own options."""
    spec = deepcopy(AUTH_ARG_SPEC)
    spec.update(extra)
    return spec
