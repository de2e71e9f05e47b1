"""Just enough of Kubernetes' protobuf encoding to read what helm's release storage sends.

client-go writes the Secrets that hold helm's release history as ``application/vnd.kubernetes.protobuf``:
the ``k8s\\0`` magic, a ``runtime.Unknown`` envelope and a ``v1.Secret`` message. Responses go back as JSON,
which client-go accepts. Only the fields a Secret and its ObjectMeta carry are decoded.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """The body is not a protobuf message this server reads."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, data[pos:pos + length]
            pos += length
        elif wire == 1:
            yield number, data[pos:pos + 8]
            pos += 8
        elif wire == 5:
            yield number, data[pos:pos + 4]
            pos += 4
        else:
            raise ProtobufError(f"wire type {wire} is not supported")


def _map_entry(data: bytes) -> tuple[str, bytes]:
    key, value = "", b""
    for number, field in _fields(data):
        if number == 1 and isinstance(field, bytes):
            key = field.decode()
        elif number == 2 and isinstance(field, bytes):
            value = field
    return key, value


def _time(data: bytes) -> str:
    seconds = 0
    for number, field in _fields(data):
        if number == 1 and isinstance(field, int):
            seconds = field
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _object_meta(data: bytes) -> dict[str, Any]:
    names = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
    meta: dict[str, Any] = {}
    for number, field in _fields(data):
        if number in names and isinstance(field, bytes):
            if field:
                meta[names[number]] = field.decode()
        elif number == 7 and isinstance(field, int):
            meta["generation"] = field
        elif number in (8, 9) and isinstance(field, bytes):
            meta["creationTimestamp" if number == 8 else "deletionTimestamp"] = _time(field)
        elif number in (11, 12) and isinstance(field, bytes):
            key, value = _map_entry(field)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = value.decode()
        elif number == 14 and isinstance(field, bytes):
            meta.setdefault("finalizers", []).append(field.decode())
    return meta


def _secret(data: bytes) -> dict[str, Any]:
    secret: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": {}}
    for number, field in _fields(data):
        if number == 1 and isinstance(field, bytes):
            secret["metadata"] = _object_meta(field)
        elif number == 2 and isinstance(field, bytes):
            key, value = _map_entry(field)
            secret.setdefault("data", {})[key] = base64.b64encode(value).decode()
        elif number == 4 and isinstance(field, bytes):
            key, value = _map_entry(field)
            secret.setdefault("stringData", {})[key] = value.decode()
        elif number == 3 and isinstance(field, bytes):
            secret["type"] = field.decode()
        elif number == 5 and isinstance(field, int):
            secret["immutable"] = bool(field)
    return secret


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object (Secrets only)."""
    if not body.startswith(MAGIC):
        raise ProtobufError("no k8s protobuf magic")
    kind, raw = "", b""
    for number, field in _fields(body[len(MAGIC):]):
        if number == 1 and isinstance(field, bytes):
            for inner, value in _fields(field):
                if inner == 2 and isinstance(value, bytes):
                    kind = value.decode()
        elif number == 2 and isinstance(field, bytes):
            raw = field
    if kind != "Secret":
        raise ProtobufError(f"protobuf {kind or 'objects'} are not supported; send JSON")
    return _secret(raw)
