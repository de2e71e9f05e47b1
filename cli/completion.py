"""Shell completion of session ids (click's completion: `eval "$(_ORZ_COMPLETE=bash_source orz)"`)."""

from __future__ import annotations

from typing import Any

import click
import httpx
from click.shell_completion import CompletionItem

COMPLETION_TIMEOUT_S = 2.0


def complete_session_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Your sessions' ids that start with what was typed, with their status; nothing when the API does not
    answer within a moment (completion must never hang a shell or print an error into it)."""
    from cli.connect import require_credentials

    try:
        creds = require_credentials()
        reply = httpx.get(f"{creds.api_url}/v1/instances", timeout=COMPLETION_TIMEOUT_S,
                          headers={"Authorization": f"Bearer {creds.api_token}"})
        reply.raise_for_status()
        instances: list[dict[str, Any]] = reply.json().get("instances", [])
    except Exception:  # completion is best effort: not logged in, API down, an odd answer
        return []
    return [CompletionItem(str(i["id"]), help=str(i.get("status", "")))
            for i in instances if str(i.get("id", "")).startswith(incomplete)]
