"""The external-data locations an ONNX graph names, read from its protobuf encoding without the onnx package.

The daemon checks them (bundle_format/bundle.py) before ONNX Runtime or TensorRT opens the graph, and does not
depend on `onnx` (a build-only package). Only the messages that can hold a tensor are walked; every other field,
weights embedded as raw bytes included, is skipped by its length without being copied.
"""

from __future__ import annotations

# Field numbers from onnx.proto: message -> {field number: message type of that field}. A tensor is stored
# outside the graph file when its TensorProto carries external_data entries (field 13).
_CHILDREN: dict[str, dict[int, str]] = {
    "Model": {7: "Graph", 20: "TrainingInfo", 25: "Function"},
    "TrainingInfo": {1: "Graph", 2: "Graph"},
    "Graph": {1: "Node", 5: "Tensor", 15: "SparseTensor"},
    "Node": {5: "Attribute"},
    "Function": {7: "Node", 11: "Attribute"},
    "Attribute": {5: "Tensor", 6: "Graph", 10: "Tensor", 11: "Graph", 22: "SparseTensor", 23: "SparseTensor"},
    "SparseTensor": {1: "Tensor", 2: "Tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 8, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64  # subgraphs nest (If, Loop, Scan); a deeper graph is a crafted one


class MalformedGraph(ValueError):
    """Bytes that are not a well-formed ONNX protobuf."""


def external_data_locations(data: bytes | memoryview) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor of the graph whose bytes live in another file."""
    found: list[tuple[str, str]] = []
    _walk(memoryview(data), "Model", found, 0)
    return found


def _fields(buf: memoryview):
    """(field number, wire type, value) of each field: an int for varints, a memoryview for the rest."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise MalformedGraph("a field runs past the end of its message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise MalformedGraph("a field runs past the end of its message")
            value, pos = buf[pos:pos + size], pos + size
        else:  # groups (3, 4) are not used by onnx.proto
            raise MalformedGraph(f"unexpected wire type {wire} in field {number}")
        yield number, wire, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:  # most keys and lengths: one byte
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedGraph("a truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _walk(buf: memoryview, message: str, found: list[tuple[str, str]], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise MalformedGraph(f"messages nested more than {_MAX_DEPTH} deep")
    if message == "Tensor":
        _tensor(buf, found)
        return
    children = _CHILDREN[message]
    for number, wire, value in _fields(buf):
        if wire == 2 and number in children:
            _walk(value, children[number], found, depth + 1)


def _tensor(buf: memoryview, found: list[tuple[str, str]]) -> None:
    name, locations = "", []
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == _TENSOR_NAME:
            name = _text(value)
        elif number == _TENSOR_EXTERNAL_DATA:
            entry = {n: _text(v) for n, w, v in _fields(value) if w == 2}
            if entry.get(_ENTRY_KEY) == "location":
                locations.append(entry.get(_ENTRY_VALUE, ""))
    found.extend((name, location) for location in locations)


def _text(value: memoryview) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedGraph("a string field that is not UTF-8") from None
