"""Label selectors (rehearsal/selectors.py) select what a real API server selects, and refuse what it refuses."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from rehearsal import selectors
from tests.rehearsal.conftest import NS

LABELS = {
    "web": {"app": "web", "tier": "front"},
    "api": {"app": "api", "tier": "back"},
    "db": {"app": "db", "tier": "back", "app.kubernetes.io/name": "postgres"},
    "bare": {},
}


@pytest.mark.parametrize(("selector", "expected"), [
    ("app in (web,api)", ["api", "web"]),
    ("app in ( web , db )", ["db", "web"]),
    ("app notin (web,api)", ["bare", "db"]),  # notin also matches objects without the key
    ("!tier", ["bare"]),
    ("tier", ["api", "db", "web"]),
    ("app=web", ["web"]),
    ("app==web", ["web"]),
    ("app!=web", ["api", "bare", "db"]),  # != also matches objects without the key
    ("tier=back,app!=db", ["api"]),
    ("tier in (back),app.kubernetes.io/name", ["db"]),
    ("app.kubernetes.io/name=postgres", ["db"]),
    ("", ["api", "bare", "db", "web"]),
])
def test_a_selector_lists_what_it_selects(core: k8s.CoreV1Api, selector: str, expected: list[str]) -> None:
    for name, labels in LABELS.items():
        core.create_namespaced_config_map(NS, {"metadata": {"name": name, "labels": labels}})
    listed = core.list_namespaced_config_map(NS, label_selector=selector).items
    assert [item.metadata.name for item in listed] == expected


MALFORMED = [
    "app in ()",  # an empty set
    "app in (web",  # unbalanced
    "=web",  # no key
    "app=web=x",  # not a label value
    "!app=web",  # ! takes a key alone
    "my app=web",  # a space in the key
    "app in web",  # a set needs parentheses
    "app=-web",  # a value starts with an alphanumeric
]


@pytest.mark.parametrize("selector", MALFORMED)
def test_a_malformed_selector_is_400_on_list_and_watch(core: k8s.CoreV1Api, selector: str) -> None:
    with pytest.raises(ApiException) as info:
        core.list_namespaced_config_map(NS, label_selector=selector)
    assert info.value.status == 400 and "BadRequest" in info.value.body
    with pytest.raises(ApiException) as watching:
        core.list_namespaced_config_map(NS, label_selector=selector, watch=True, timeout_seconds=1,
                                        _preload_content=False)
    assert watching.value.status == 400


@pytest.mark.parametrize("selector", MALFORMED)
def test_parse_names_the_bad_term(selector: str) -> None:
    with pytest.raises(selectors.SelectorError, match="unable to parse requirement"):
        selectors.parse(selector)


def test_a_label_selector_object_becomes_the_same_requirements() -> None:
    wanted = selectors.from_label_selector({
        "matchLabels": {"app": "db"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back", "middle"]},
                             {"key": "legacy", "operator": "DoesNotExist"},
                             {"key": "app.kubernetes.io/name", "operator": "Exists"},
                             {"key": "zone", "operator": "NotIn", "values": ["b"]}]})
    assert wanted(LABELS["db"])
    assert not wanted({**LABELS["db"], "legacy": "1"})
    assert not wanted({**LABELS["db"], "zone": "b"})
    assert not wanted(LABELS["api"])
    assert selectors.from_label_selector(None)({"any": "thing"})
