"""The process kubelet's pure helpers: $(VAR) expansion and downward-API field paths (rehearsal/kubelet.py)."""

from __future__ import annotations

import pytest

from rehearsal.kubelet import _expand, _field


@pytest.mark.parametrize(("value", "expected"), [
    ("$(HOST):$(PORT)", "db:5432"),
    ("$$(HOST)", "$(HOST)"),  # $$ escapes: the reference stays literal
    ("cost $$5", "cost $5"),
    ("$(MISSING)/x", "$(MISSING)/x"),  # an undefined reference is left as written
    ("$HOST ${HOST}", "$HOST ${HOST}"),  # only the $(VAR) form expands
    ("$(HOST", "$(HOST"),
    ("$$$(HOST)", "$db"),
    ("", ""),
])
def test_expand(value: str, expected: str) -> None:
    assert _expand(value, {"HOST": "db", "PORT": "5432"}) == expected


POD = {"metadata": {"name": "orz-1", "namespace": "team", "labels": {"app.kubernetes.io/name": "orz"},
                    "annotations": {"a": "b"}},
       "spec": {"nodeName": "node-1", "serviceAccountName": "runner"},
       "status": {"podIP": "10.0.0.7", "hostIP": "192.168.1.2"}}


@pytest.mark.parametrize(("path", "expected"), [
    ("metadata.name", "orz-1"),
    ("metadata.namespace", "team"),
    ("spec.nodeName", "node-1"),
    ("spec.serviceAccountName", "runner"),
    ("status.podIP", "10.0.0.7"),
    ("metadata.labels['app.kubernetes.io/name']", "orz"),
    ("metadata.annotations['a']", "b"),
    ("metadata.labels['absent']", ""),
    ("status.nothing.deeper", ""),
])
def test_field(path: str, expected: str) -> None:
    assert _field(POD, path) == expected


def test_field_reads_resource_quantities_as_text() -> None:
    assert _field({"limits": {"cpu": 2, "memory": "1Gi"}}, "limits.cpu") == "2"


def test_a_policys_directions_default_as_the_api_server_defaults_them() -> None:
    """An empty or missing policyTypes means Ingress, plus Egress only when there are egress rules: a policy
    with `egress: []` and no policyTypes leaves the Pod's egress open on a real cluster."""
    from rehearsal.policy import policy_types

    assert policy_types({"spec": {}}) == ["Ingress"]
    assert policy_types({"spec": {"egress": []}}) == ["Ingress"]
    assert policy_types({"spec": {"policyTypes": [], "egress": [{"to": []}]}}) == ["Ingress", "Egress"]
    assert policy_types({"spec": {"egress": [{"ports": [{"port": 53}]}]}}) == ["Ingress", "Egress"]
    assert policy_types({"spec": {"policyTypes": ["Egress"]}}) == ["Egress"]
