"""The Sparkplug B payload messages, as protobuf classes built at import from a descriptor.

The messages and field numbers are those of the Sparkplug B 3.0 specification's
`sparkplug_b.proto` (Eclipse Tahu), written out here for the part the gateway uses: Payload,
Metric, PropertySet and PropertyValue. Templates, DataSets and MetaData are not sent, so they are
left out; their field numbers stay unused, so any full decoder reads what we encode. Building the
descriptor at run time needs only the `protobuf` runtime: no protoc, no generated file to keep in
step. The classes live in a pool of their own, so they never clash with another library's
generated `sparkplug_b_pb2` in the same process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "edge_gateway.sparkplug_b"

# Sparkplug B data types (the specification's DataType enum)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14

_F = descriptor_pb2.FieldDescriptorProto
_OPT = _F.LABEL_OPTIONAL
_REP = _F.LABEL_REPEATED


def _message(file: descriptor_pb2.FileDescriptorProto, name: str,
             fields: list[tuple[str, int, int, int, str | None]]) -> None:
    msg = file.message_type.add(name=name)
    for field_name, number, type_, label, type_name in fields:
        f = msg.field.add(name=field_name, number=number, type=type_, label=label)
        if type_name:
            f.type_name = f".{PACKAGE}.{type_name}"


def _values(first: int) -> list[tuple[str, int, int, int, None]]:
    """The scalar value fields, in the order both PropertyValue (from 3) and Metric (from 10) number them."""
    kinds = [("int_value", _F.TYPE_UINT32), ("long_value", _F.TYPE_UINT64), ("float_value", _F.TYPE_FLOAT),
             ("double_value", _F.TYPE_DOUBLE), ("boolean_value", _F.TYPE_BOOL), ("string_value", _F.TYPE_STRING)]
    return [(name, first + i, type_, _OPT, None) for i, (name, type_) in enumerate(kinds)]


def _build() -> descriptor_pool.DescriptorPool:
    file = descriptor_pb2.FileDescriptorProto(name="edge_gateway_sparkplug_b.proto", package=PACKAGE,
                                              syntax="proto2")
    _message(file, "PropertyValue", [
        ("type", 1, _F.TYPE_UINT32, _OPT, None),
        ("is_null", 2, _F.TYPE_BOOL, _OPT, None),
        *_values(3),
    ])
    _message(file, "PropertySet", [
        ("keys", 1, _F.TYPE_STRING, _REP, None),
        ("values", 2, _F.TYPE_MESSAGE, _REP, "PropertyValue"),
    ])
    _message(file, "Metric", [
        ("name", 1, _F.TYPE_STRING, _OPT, None),
        ("alias", 2, _F.TYPE_UINT64, _OPT, None),
        ("timestamp", 3, _F.TYPE_UINT64, _OPT, None),
        ("datatype", 4, _F.TYPE_UINT32, _OPT, None),
        ("is_historical", 5, _F.TYPE_BOOL, _OPT, None),
        ("is_transient", 6, _F.TYPE_BOOL, _OPT, None),
        ("is_null", 7, _F.TYPE_BOOL, _OPT, None),
        ("properties", 9, _F.TYPE_MESSAGE, _OPT, "PropertySet"),
        *_values(10),
        ("bytes_value", 16, _F.TYPE_BYTES, _OPT, None),
    ])
    _message(file, "Payload", [
        ("timestamp", 1, _F.TYPE_UINT64, _OPT, None),
        ("metrics", 2, _F.TYPE_MESSAGE, _REP, "Metric"),
        ("seq", 3, _F.TYPE_UINT64, _OPT, None),
        ("uuid", 4, _F.TYPE_STRING, _OPT, None),
        ("body", 5, _F.TYPE_BYTES, _OPT, None),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


_POOL = _build()
Payload = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.Payload"))
Metric = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.Metric"))

# Which Metric field holds a value of each data type (the specification's mapping).
VALUE_FIELD = {
    INT8: "int_value", INT16: "int_value", INT32: "int_value",
    UINT8: "int_value", UINT16: "int_value", UINT32: "int_value",
    INT64: "long_value", UINT64: "long_value", DATETIME: "long_value",
    FLOAT: "float_value", DOUBLE: "double_value", BOOLEAN: "boolean_value",
    STRING: "string_value", TEXT: "string_value",
}
# Signed integers travel as two's complement of their own width in the unsigned field (as Tahu's
# Python core and pysparkplug encode and decode them).
_WRAP = {INT8: 1 << 8, INT16: 1 << 16, INT32: 1 << 32, INT64: 1 << 64}
# A number outside its type's range makes the metric null rather than wrapping to another value.
_RANGE = {INT8: (-(1 << 7), (1 << 7) - 1), INT16: (-(1 << 15), (1 << 15) - 1), INT32: (-(1 << 31), (1 << 31) - 1),
          INT64: (-(1 << 63), (1 << 63) - 1), UINT8: (0, 255), UINT16: (0, 65535), UINT32: (0, (1 << 32) - 1),
          UINT64: (0, (1 << 64) - 1)}


def wire_value(datatype: int, value):
    """`value` as the Metric field of `datatype` holds it, or None when it cannot be (the metric
    is then sent null: never a made-up or wrapped-around value)."""
    if value is None:
        return None
    if datatype == BOOLEAN:
        return value if isinstance(value, bool) else None
    if datatype in (STRING, TEXT):
        return value if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if datatype in (FLOAT, DOUBLE):
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    lo, hi = _RANGE[datatype]
    if not lo <= value <= hi:
        return None
    return value + _WRAP[datatype] if value < 0 else value
