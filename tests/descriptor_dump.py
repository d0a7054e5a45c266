"""What the wire depends on in generated protobuf modules, as plain JSON-able data.

Runs in two interpreters: in the test process (our dd.proto.inference modules,
protobuf 7) and as a script in tritonclient's own virtual environment
(protobuf < 7), so it uses only descriptor attributes both versions have and
imports nothing outside the standard library and protobuf.

    python descriptor_dump.py tritonclient.grpc.service_pb2 tritonclient.grpc.model_config_pb2
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any


def _label(field: Any) -> str:
    # FieldDescriptor.label is gone from protobuf 7; these two exist in 6 and 7.
    if field.is_repeated:
        return "repeated"
    return "required" if field.is_required else "optional"


def _field(field: Any) -> dict[str, Any]:
    ref = field.message_type or field.enum_type
    return {
        "number": field.number,
        "type": field.type,  # FieldDescriptor.TYPE_*: the wire encoding
        "label": _label(field),
        "type_name": ref.full_name if ref is not None else "",
        "oneof": field.containing_oneof.name if field.containing_oneof is not None else "",
        "packed": bool(field.is_packed),
        "map": bool(field.message_type is not None and field.message_type.GetOptions().map_entry),
    }


def _messages(descriptors: Any, out: dict[str, Any], enums: dict[str, Any]) -> None:
    for message in descriptors:
        out[message.full_name] = {f.name: _field(f) for f in message.fields}
        for enum in message.enum_types:
            enums[enum.full_name] = {v.name: v.number for v in enum.values}
        _messages(message.nested_types, out, enums)


def dump(module_names: list[str]) -> dict[str, Any]:
    """Messages (nested ones too) with their fields, enums with their values, and
    services with their methods, of every .proto file behind the named modules."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    services: dict[str, Any] = {}
    for name in module_names:
        file = importlib.import_module(name).DESCRIPTOR
        _messages(file.message_types_by_name.values(), messages, enums)
        for enum in file.enum_types_by_name.values():
            enums[enum.full_name] = {v.name: v.number for v in enum.values}
        for service in file.services_by_name.values():
            services[service.full_name] = {
                m.name: {"input": m.input_type.full_name, "output": m.output_type.full_name,
                         "client_streaming": bool(m.client_streaming),
                         "server_streaming": bool(m.server_streaming)}
                for m in service.methods}
    return {"messages": messages, "enums": enums, "services": services}


if __name__ == "__main__":
    json.dump(dump(sys.argv[1:]), sys.stdout, indent=1, sort_keys=True)
