# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Kubernetes name, label and annotation syntax, checked before anything is sent to the API."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import re
from typing import Any, Dict, Optional

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_RE = re.compile(r"%s(?:\.%s)*" % (DNS_LABEL, DNS_LABEL))
DNS_LABEL_RE = re.compile(DNS_LABEL)
LABEL_NAME_RE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
LABEL_VALUE_RE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


# Image references, after the distribution/reference grammar.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
REPOSITORY_RE = re.compile(r"(?:%s/)?%s(?:/%s)*" % (_DOMAIN, _PATH_COMPONENT, _PATH_COMPONENT))
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")


def check_image_reference(option: str, reference: Any) -> str:
    """A full image reference: repository[:tag][@sha256:digest]."""
    text = reference if isinstance(reference, str) else ""
    rest, _at, digest = text.partition("@")
    repository, tag = rest, ""
    if ":" in rest.rsplit("/", 1)[-1]:
        repository, _colon, tag = rest.rpartition(":")
    ok = (bool(repository) and len(repository) <= 255 and REPOSITORY_RE.fullmatch(repository) is not None
          and (not tag or TAG_RE.fullmatch(tag) is not None) and (not digest or DIGEST_RE.fullmatch(digest) is not None))
    if not ok:
        raise InvalidOptionError("%s %r is not a valid image reference: [registry[:port]/]path[:tag][@sha256:digest] "
                                 "with lower-case path components, for example "
                                 "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04" % (option, reference))
    return text


def label_text(value: Any) -> str:
    """A label or env value as Kubernetes stores it: YAML's true is "true", not "True"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_dns_subdomain(option: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > 253 or not DNS_SUBDOMAIN_RE.fullmatch(value):
        raise InvalidOptionError("%s %r is not a valid Kubernetes name: lower-case letters, digits, '-' and '.', "
                                 "starting and ending with a letter or digit, at most 253 characters" % (option, value))
    return value


def check_namespace(option: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > 63 or not DNS_LABEL_RE.fullmatch(value):
        raise InvalidOptionError("%s %r is not a valid namespace name: lower-case letters, digits and '-', "
                                 "at most 63 characters" % (option, value))
    return value


def check_label_key(option: str, key: Any) -> str:
    """A label (or annotation) key: an optional DNS subdomain prefix and a name of at most 63 characters."""
    if not isinstance(key, str) or not key:
        raise InvalidOptionError("%s: key %r is not a valid label key" % (option, key))
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        raise InvalidOptionError("%s: key %r has an invalid prefix %r (a DNS subdomain is expected)"
                                 % (option, key, prefix))
    if len(name) > 63 or not LABEL_NAME_RE.fullmatch(name):
        raise InvalidOptionError("%s: key %r: the name part must be 1-63 characters of letters, digits, '-', '_' "
                                 "or '.', starting and ending with a letter or digit" % (option, key))
    return key


def check_label_value(option: str, key: str, value: Any) -> str:
    if value is None:
        raise InvalidOptionError("%s: label %s has no value" % (option, key))
    text = label_text(value)
    if len(text) > 63 or not LABEL_VALUE_RE.fullmatch(text):
        raise InvalidOptionError("%s: value %r of label %s is not a valid label value: at most 63 characters of "
                                 "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                                 % (option, text, key))
    return text


def check_labels(option: str, labels: Optional[Dict[str, Any]]) -> Dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise InvalidOptionError("%s must be a dictionary of label keys and values" % option)
    return {check_label_key(option, k): check_label_value(option, k, v) for k, v in labels.items()}
