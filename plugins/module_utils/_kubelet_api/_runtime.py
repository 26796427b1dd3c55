# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Runtime for the generated kubelet contracts.

The generated modules embed a serialized FileDescriptorProto; this file adds it to a private
descriptor pool (so both upstream ``api.proto`` files, registered under distinct paths, load
in one process without touching protobuf's default pool) and builds the message classes.
:class:`Service` describes a gRPC service for grpcio: ``stub(channel)`` for clients and
``add_to_server(servicer, server)`` for servers.

protobuf and grpcio are optional at import time: without them the message names are ``None``
and ``HAS_PROTOBUF`` / ``HAS_GRPC`` say why, so modules can fail with missing_required_lib.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import traceback
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
except ImportError:
    HAS_PROTOBUF = False
    PROTOBUF_IMPORT_ERROR: Optional[str] = traceback.format_exc()
else:
    HAS_PROTOBUF = True
    PROTOBUF_IMPORT_ERROR = None

try:
    import grpc
except ImportError:
    HAS_GRPC = False
    GRPC_IMPORT_ERROR: Optional[str] = traceback.format_exc()
else:
    HAS_GRPC = True
    GRPC_IMPORT_ERROR = None

_POOL: Any = descriptor_pool.DescriptorPool() if HAS_PROTOBUF else None


def _message_class(descriptor: Any) -> Any:
    get_message_class = getattr(message_factory, "GetMessageClass", None)
    if get_message_class is not None:
        return get_message_class(descriptor)
    return message_factory.MessageFactory(_POOL).GetPrototype(descriptor)  # protobuf < 4.22


def load_file(serialized: bytes) -> Dict[str, Any]:
    """Register one serialized FileDescriptorProto; return its top-level message classes by name."""
    if not HAS_PROTOBUF:
        return {}
    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
    try:
        file_desc = _POOL.FindFileByName(name)
    except KeyError:
        _POOL.AddSerializedFile(serialized)
        file_desc = _POOL.FindFileByName(name)
    return {name: _message_class(desc) for name, desc in file_desc.message_types_by_name.items()}


MethodSpec = Tuple[str, Any, Any]  # (kind, request class, response class)


class Service:
    """A gRPC service of a generated contract: its full name and its methods."""

    def __init__(self, full_name: str, methods: Dict[str, MethodSpec]) -> None:
        self.full_name = full_name
        self.methods = methods

    def path(self, method: str) -> str:
        """The HTTP/2 path of a method, e.g. ``/v1beta1.DevicePlugin/ListAndWatch``."""
        return "/%s/%s" % (self.full_name, method)

    def stub(self, channel: Any) -> SimpleNamespace:
        """Client callables, one attribute per method, bound to ``channel``."""
        calls: Dict[str, Callable[..., Any]] = {}
        for name, (kind, request, response) in self.methods.items():
            factory = getattr(channel, kind)
            calls[name] = factory(
                self.path(name),
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
        return SimpleNamespace(**calls)

    def add_to_server(self, servicer: Any, server: Any) -> None:
        """Serve ``servicer``'s methods (same names as the service's) on a grpc server."""
        handlers = {}
        for name, (kind, request, response) in self.methods.items():
            if not hasattr(servicer, name):
                continue  # the server answers UNIMPLEMENTED, as an older peer would
            make = getattr(grpc, "%s_rpc_method_handler" % kind)
            handlers[name] = make(
                getattr(servicer, name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.full_name, handlers),))
