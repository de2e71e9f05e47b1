"""Label selectors as the API server parses them: equality (=, ==, !=) and set-based (in, notin, exists, !)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Labels = Mapping[str, str]
Requirement = Callable[[Labels], bool]

_SET = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
# A label key (optional DNS-subdomain prefix and a name) and a label value, as the API server checks them.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
_VALUE = re.compile(rf"({_NAME})?")


class SelectorError(ValueError):
    """The selector does not parse; the message is what the API server answers with 400."""


def _split_terms(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t.strip() for t in terms if t.strip()]


def _checked(term: str, key: str, values: set[str] | None = None) -> str:
    """`key` when it and `values` are valid label keys and values, else SelectorError naming the term."""
    if not _KEY.fullmatch(key) or any(not _VALUE.fullmatch(v) for v in values or ()):
        raise SelectorError(f"unable to parse requirement: {term!r}: invalid label key or value")
    return key


def _term(term: str) -> Requirement:
    found = _SET.match(term)
    if found:
        key, op, raw = found.groups()
        values = {v.strip() for v in raw.split(",") if v.strip()}
        if not values:
            raise SelectorError(f"unable to parse requirement: {term!r}: for 'in', 'notin' operators, "
                                "values set can't be empty")
        _checked(term, key, values)
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if term.startswith("!"):
        key = _checked(term, term[1:].strip())
        return lambda labels: key not in labels
    for op in ("!=", "==", "="):
        if op in term:
            key, value = (part.strip() for part in term.split(op, 1))
            _checked(term, key, {value})
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    key = _checked(term, term.strip())
    return lambda labels: key in labels


def parse(selector: str) -> Requirement:
    """A predicate over labels; an empty selector matches everything."""
    requirements = [_term(t) for t in _split_terms(selector or "")]
    return lambda labels: all(r(labels) for r in requirements)


def from_label_selector(spec: Mapping | None) -> Requirement:
    """A predicate from a LabelSelector object (matchLabels + matchExpressions)."""
    spec = spec or {}
    terms = [f"{k}={v}" for k, v in (spec.get("matchLabels") or {}).items()]
    for expr in spec.get("matchExpressions") or []:
        op, key, values = expr["operator"], expr["key"], expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    return parse(",".join(terms))
