"""Protobuf Secrets as client-go (helm's release storage) sends them, decoded by rehearsal/protobuf.py.

The bytes are built here with a minimal protobuf writer following k8s.io/api's generated.proto field numbers
(runtime.Unknown: typeMeta=1, raw=2; TypeMeta: apiVersion=1, kind=2; Secret: metadata=1, data=2, type=3,
stringData=4, immutable=5; ObjectMeta: name=1, namespace=3, labels=11, annotations=12, finalizers=14).
"""

from __future__ import annotations

import base64

import pytest
import urllib3

from rehearsal.apiserver import FakeApiServer
from rehearsal.protobuf import MAGIC, ProtobufError, decode
from tests.rehearsal.conftest import NS


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def entry(number: int, key: str, value: bytes | str) -> bytes:
    return field(number, field(1, key) + field(2, value))


def envelope(kind: str, raw: bytes) -> bytes:
    return MAGIC + field(1, field(1, "v1") + field(2, kind)) + field(2, raw) + field(3, "") + field(4, "")


def helm_secret() -> bytes:
    meta = (field(1, "sh.helm.release.v1.orz.v1") + field(3, NS) + entry(11, "owner", "helm")
            + entry(11, "status", "deployed") + entry(12, "note", "x") + field(14, "example.com/keep"))
    return field(1, meta) + entry(2, "release", b"\x00\xffgzip") + field(3, "helm.sh/release.v1") \
        + entry(4, "plain", "text") + field(5, 1)


def test_a_secret_decodes_to_its_json_form() -> None:
    secret = decode(envelope("Secret", helm_secret()))
    assert secret == {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sh.helm.release.v1.orz.v1", "namespace": NS,
                     "labels": {"owner": "helm", "status": "deployed"}, "annotations": {"note": "x"},
                     "finalizers": ["example.com/keep"]},
        "data": {"release": base64.b64encode(b"\x00\xffgzip").decode()},
        "type": "helm.sh/release.v1", "stringData": {"plain": "text"}, "immutable": True}


def test_a_non_secret_is_refused() -> None:
    with pytest.raises(ProtobufError, match="ConfigMap"):
        decode(envelope("ConfigMap", field(1, field(1, "c"))))


@pytest.mark.parametrize("body", [b"{\"kind\": \"Secret\"}", MAGIC + b"\x0a\x85", MAGIC + b"\x0b"])
def test_garbage_is_refused(body: bytes) -> None:
    with pytest.raises(ProtobufError):
        decode(body)


def post(server: FakeApiServer, body: bytes) -> tuple[int, bytes]:
    response = urllib3.request("POST", f"{server.url}/api/v1/namespaces/{NS}/secrets", body=body, timeout=5,
                               headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
    return response.status, response.data


def test_a_protobuf_secret_is_stored_over_http(server: FakeApiServer) -> None:
    status, _ = post(server, envelope("Secret", helm_secret()))
    assert status == 201
    stored = server.get("secrets", NS, "sh.helm.release.v1.orz.v1")
    assert stored is not None and stored["metadata"]["labels"] == {"owner": "helm", "status": "deployed"}
    assert base64.b64decode(stored["data"]["release"]) == b"\x00\xffgzip"


def test_a_protobuf_non_secret_is_400_over_http(server: FakeApiServer) -> None:
    status, body = post(server, envelope("ConfigMap", field(1, field(1, "c"))))
    assert status == 400 and b"BadRequest" in body
