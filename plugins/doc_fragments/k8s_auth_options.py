# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options to reach the Kubernetes API: the names and environment fallbacks of kubernetes.core."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  kubeconfig:
    description:
      - Path to a kubeconfig file, or the kubeconfig itself as a dictionary.
      - When no kubeconfig, O(host) or O(api_key) is given, the client looks for C(~/.kube/config),
        then for the in-cluster service account (AWX execution environments running in a pod).
      - Falls back to the environment variable E(K8S_AUTH_KUBECONFIG).
    type: raw
  context:
    description:
      - The kubeconfig context to use instead of the current one.
      - Falls back to the environment variable E(K8S_AUTH_CONTEXT).
    type: str
  host:
    description:
      - URL of the Kubernetes API server, for example C(https://10.0.0.1:6443).
      - Falls back to the environment variable E(K8S_AUTH_HOST).
    type: str
  api_key:
    description:
      - Bearer token to authenticate with the API.
      - Falls back to the environment variable E(K8S_AUTH_API_KEY).
    type: str
  username:
    description:
      - Username for basic authentication.
      - Falls back to the environment variable E(K8S_AUTH_USERNAME).
    type: str
  password:
    description:
      - Password for basic authentication.
      - Falls back to the environment variable E(K8S_AUTH_PASSWORD).
    type: str
  validate_certs:
    description:
      - Whether to verify the API server's TLS certificate.
      - Falls back to the environment variable E(K8S_AUTH_VERIFY_SSL).
    type: bool
    aliases: [verify_ssl]
  ca_cert:
    description:
      - Path to a CA certificate used to verify the API server.
      - Falls back to the environment variable E(K8S_AUTH_SSL_CA_CERT).
    type: path
    aliases: [ssl_ca_cert]
  client_cert:
    description:
      - Path to a client certificate for TLS client authentication.
      - Falls back to the environment variable E(K8S_AUTH_CERT_FILE).
    type: path
    aliases: [cert_file]
  client_key:
    description:
      - Path to the key of O(client_cert).
      - Falls back to the environment variable E(K8S_AUTH_KEY_FILE).
    type: path
    aliases: [key_file]
  proxy:
    description:
      - URL of an HTTP proxy to reach the API through.
      - Falls back to the environment variable E(K8S_AUTH_PROXY).
    type: str
  request_timeout:
    description:
      - Seconds each API request may take (connect and read) before it is abandoned.
    type: float
    default: 20
  api_retries:
    description:
      - How many times a request that failed with HTTP 429, a 5xx status or a dropped connection
        is retried, with exponential backoff (honouring C(Retry-After)), before the task fails.
    type: int
    default: 4
notes:
  - The options above are shared by every module of the C(gpunode.bringup.k8s) action group, so
    one C(module_defaults) block with C(group/gpunode.bringup.k8s) sets them for all.
requirements:
  - kubernetes >= 29.0.0 (Python library on the controller)
"""
