"""Session ids users can type: `<repo-name>-<6 random chars>`, valid as SSH user and DNS label."""

from __future__ import annotations

import re
import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits
_SUFFIX_LEN = 6
_STEM_MAX = 32 - _SUFFIX_LEN - 1


def _stem(repo_url: str | None) -> str:
    if not repo_url:
        return "session"
    name = re.split(r"[/:]", repo_url.rstrip("/"))[-1]
    name = name.removesuffix(".git").lower()
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:_STEM_MAX].strip("-")
    if not name or not name[0].isalpha():
        name = f"s-{name}".strip("-")[:_STEM_MAX].strip("-")
    return name or "session"


def new_session_id(repo_url: str | None) -> str:
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(_SUFFIX_LEN))
    return f"{_stem(repo_url)}-{suffix}"
