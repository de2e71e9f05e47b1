"""How long a session may sit idle before it is stopped, and how long a stopped one is kept: the org's own
values (set by `orz admin`) where it has them, else the deployment's. The reaper acts on them; `/v1/me`
tells users (`orz cloud new` and `whoami` print them)."""

from __future__ import annotations

from api.db.models import Org
from api.settings import Settings


def effective_idle_timeout_s(settings: Settings, org: Org | None, spec_value: object) -> int:
    """The session's own timeout if it asked for one, bounded by its org's (or the deployment's) limit."""
    if org is not None and org.idle_timeout_s:
        limit = org.idle_timeout_s
    else:
        limit = settings.idle_timeout_s or settings.plan_idle_timeout_s
    if isinstance(spec_value, int) and not isinstance(spec_value, bool) and spec_value > 0:
        return min(spec_value, limit)
    return limit


def effective_retention_s(settings: Settings, org: Org | None) -> int:
    return org.retention_s if org is not None and org.retention_s else settings.retention_s
