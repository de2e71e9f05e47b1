"""Names are valid DNS-1123 labels, stable for one session id and unique across ids."""

from __future__ import annotations

import itertools

import pytest

from api.instances.providers.kubernetes import names

IDS = ["a", "brave-otter-42", "x" * 32, "0-0", "a1b2c3"]
ODD_IDS = ["Has_Upper", "x" * 80, "-lead", "trail-", "a..b", "", "ünïcode"]
BUILDERS = [names.root_name, names.pod_name, names.pvc_name, names.secret_name, names.network_policy_name]


@pytest.mark.parametrize("session_id", IDS + ODD_IDS)
def test_names_are_dns1123_labels(session_id: str) -> None:
    for build in BUILDERS:
        name = build(session_id)
        assert names.DNS1123_LABEL_RE.match(name), name
        assert len(name) <= 63


def test_names_are_stable() -> None:
    for session_id in IDS + ODD_IDS:
        assert [b(session_id) for b in BUILDERS] == [b(session_id) for b in BUILDERS]
    assert names.pod_name("brave-otter-42") == "orz-brave-otter-42"
    assert names.pvc_name("brave-otter-42") == "orz-brave-otter-42-ws"


def test_names_are_unique_across_sessions() -> None:
    # Ids that sanitise to the same text must still get different names (the hash suffix).
    ids = [*IDS, *ODD_IDS, "has-upper", "HAS_UPPER", "a-b", "a.b", "x" * 81]
    ids += [names.base_name(i).removeprefix("orzx-") for i in ODD_IDS]  # valid ids that look sanitised
    for build in BUILDERS:
        built = [build(i) for i in ids]
        assert len(set(built)) == len(ids), build.__name__


def test_per_kind_names_differ_where_kinds_share_a_namespace_index() -> None:
    # The PVC and the Secret are different kinds and could share a name, but distinct names read better.
    for session_id in IDS:
        built = {names.pvc_name(session_id), names.secret_name(session_id), names.pod_name(session_id)}
        assert len(built) == 3


def test_no_collision_between_one_sessions_pvc_and_anothers_pod() -> None:
    for a, b in itertools.permutations(IDS, 2):
        assert names.pvc_name(a) != names.pod_name(b)
        assert names.secret_name(a) != names.pod_name(b)


@pytest.mark.parametrize("value", ["org-1", "x" * 80, "a b", "", "ok.value_1"])
def test_label_values_are_valid(value: str) -> None:
    assert names.LABEL_VALUE_RE.match(names.label_value(value))
    assert len(names.label_value(value)) <= 63


def test_parse_selector() -> None:
    assert names.parse_selector("a=b, c.io/d==e") == {"a": "b", "c.io/d": "e"}
    with pytest.raises(ValueError, match="key=value"):
        names.parse_selector("nokey")
    with pytest.raises(ValueError, match="empty"):
        names.parse_selector(" , ")
