"""The lifecycle scheduler: APScheduler (3.x) jobs that reap, reconcile and purge, led by one replica.

Each replica also sends webhook deliveries (api/webhooks/delivery.py), leader or not.

Every replica (each API process with ``run_scheduler``, each ``orz scheduler``) runs the same jobs; a job
does nothing unless this replica holds the database lease (api/jobs/lease.py), renewed every third of
a lease period and before each job. Jobs of one replica run one at a time, so the reaper and the
reconciler never act on the same session at once from here; across replicas the lease keeps them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import metrics
from api.credentials.secrets_box import SecretsBox
from api.db.base import utcnow
from api.db.engine import create_engine, session_factory
from api.db.migrate import wait_for_schema
from api.instances.providers.base import Provider
from api.instances.service import InstanceService, SecretEnvSource
from api.jobs.lease import Lease, LeaseLost
from api.jobs.purge import Purger
from api.jobs.reap_idle import IdleReaper
from api.jobs.reconcile import Reconciler
from api.secrets.service import SecretService
from api.settings import Settings
from api.webhooks.delivery import Deliverer

log = logging.getLogger(__name__)

LEASE_NAME = "lifecycle"
PURGE_INTERVAL_S = 3600
# On shutdown a job in the middle of a pass gets this long to finish before it is cancelled.
STOP_GRACE_S = 10.0

Clock = Callable[[], datetime]
JobFn = Callable[[Callable[[], bool]], Awaitable[object]]


class LifecycleScheduler:
    """The jobs of one replica, the lease that decides whether they act, and their APScheduler."""

    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        provider: Provider,
        *,
        clock: Clock | None = None,
        holder: str | None = None,
        gateway_public_key: str = "",
        secret_env: SecretEnvSource | None = None,
    ) -> None:
        """``clock``: a stand-in for time in tests; by default sessions age by this machine's clock and the
        lease by the database's (so replicas with skewed clocks still agree on who leads)."""
        self.settings = settings
        self.service = InstanceService(
            settings, sessions, provider, gateway_public_key=gateway_public_key, secret_env=secret_env,
            clock=clock or utcnow,
        )
        self.service.on_transition.append(_count_transition)
        self.lease = Lease(sessions, name=LEASE_NAME, duration_s=settings.scheduler_lease_s, holder=holder,
                           clock=clock)
        # Every state change the jobs make is fenced by the lease (a deposed leader's write fails).
        self.service.fence = self.lease.fence
        self.jobs: dict[str, JobFn] = {
            "reap": IdleReaper(self.service, settings).run_once,
            "reconcile": Reconciler(self.service, settings).run_once,
            "purge": Purger(sessions, self.service.now, settings).run_once,
        }
        # Webhook deliveries run on every replica, outside the lease: rows are claimed one by one
        # (api/webhooks/delivery.py), and a slow receiver must not hold up the reaper.
        self.deliverer = Deliverer(settings, sessions, SecretsBox.from_settings(settings), holder=self.lease.holder)
        # Passes this replica actually ran as leader, by job (for logs and tests).
        self.runs: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._aps: AsyncIOScheduler | None = None
        self._inflight: set[asyncio.Task[object]] = set()
        self._stopping = False

    @property
    def holder(self) -> str:
        return self.lease.holder

    def is_leader(self) -> bool:
        return self.lease.held()

    async def tick(self) -> bool:
        """Take or renew the lease; True while this replica leads."""
        try:
            await self.lease.acquire()
        except (SQLAlchemyError, OSError) as exc:
            # The database is unreachable: we cannot renew, so we lead only until the lease runs out.
            log.warning("scheduler lease not renewed: %s", exc.__class__.__name__)
        leader = self.lease.held()
        metrics.SCHEDULER_LEADER.set(1 if leader else 0)
        return leader

    async def run_job(self, name: str) -> object | None:
        """One pass of a job if this replica leads; None when it stands by (or is stopping)."""
        if self._stopping:
            return None
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            async with self._lock:
                if self._stopping or not await self.tick():
                    metrics.SCHEDULER_JOB_RUNS.labels(task=name, result="standby").inc()
                    return None
                started = time.perf_counter()
                try:
                    result = await self.jobs[name](self.lease.held)
                except LeaseLost as lost:
                    log.warning("scheduler job %s stopped: %s", name, lost)
                    metrics.SCHEDULER_JOB_RUNS.labels(task=name, result="fenced").inc()
                    return None
                except Exception:
                    # A failed pass is logged and retried on the next tick; the scheduler keeps going.
                    log.exception("scheduler job %s failed", name)
                    metrics.SCHEDULER_JOB_RUNS.labels(task=name, result="error").inc()
                    return None
                finally:
                    metrics.SCHEDULER_JOB_DURATION.labels(task=name).observe(time.perf_counter() - started)
                self.runs[name] += 1
                metrics.SCHEDULER_JOB_RUNS.labels(task=name, result="ok").inc()
                return result
        finally:
            if task is not None:
                self._inflight.discard(task)

    def start(self) -> None:
        """Schedule the jobs on the running event loop (call from inside it)."""
        if self._aps is not None:
            return
        for name in ("apscheduler.scheduler", "apscheduler.executors.default"):
            # APScheduler logs every run at INFO; our jobs log what they changed instead.
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        reap_s = self.settings.reap_interval_s
        aps = AsyncIOScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1})
        aps.add_job(self.tick, "interval", id="lease", seconds=max(1.0, self.settings.scheduler_lease_s / 3),
                    next_run_time=datetime.now(UTC), misfire_grace_time=self.settings.scheduler_lease_s)
        aps.add_job(self.run_job, "interval", id="reap", args=["reap"], seconds=reap_s, misfire_grace_time=reap_s)
        aps.add_job(self.run_job, "interval", id="reconcile", args=["reconcile"], seconds=reap_s,
                    misfire_grace_time=reap_s)
        aps.add_job(self.run_job, "interval", id="purge", args=["purge"], seconds=PURGE_INTERVAL_S,
                    misfire_grace_time=PURGE_INTERVAL_S)
        aps.start()
        self._aps = aps
        self.deliverer.start()
        log.info("scheduler started as %s (reap/reconcile every %d s, lease %d s)",
                 self.holder, reap_s, self.settings.scheduler_lease_s)

    async def stop(self, *, release: bool = True) -> None:
        """Stop scheduling, let a running pass finish, and give the lease up (``release=False``: a crash)."""
        self._stopping = True
        aps, self._aps = self._aps, None
        deliveries = asyncio.get_running_loop().create_task(self.deliverer.stop(STOP_GRACE_S))
        if aps is not None and aps.running:
            aps.pause()
        if self._inflight:
            _done, pending = await asyncio.wait(set(self._inflight), timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
        if aps is not None and aps.running:
            aps.shutdown(wait=False)
            # AsyncIOScheduler shuts down on the loop's next turn; let it, so no timer outlives us.
            for _ in range(100):
                if not aps.running:
                    break
                await asyncio.sleep(0.01)
        await deliveries
        if release:
            try:
                await self.lease.release()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("scheduler lease not released (it will expire): %s", exc.__class__.__name__)
        metrics.SCHEDULER_LEADER.set(0)


def _count_transition(_row: object, _from: object, to: object) -> None:
    metrics.SESSION_TRANSITIONS.labels(to_state=str(getattr(to, "value", to))).inc()


@contextlib.asynccontextmanager
async def _scheduler(settings: Settings, *, clock: Clock | None, provider: Provider | None,
                     secret_env: SecretEnvSource | None) -> AsyncIterator[LifecycleScheduler]:
    # Imported here: api.app pulls in Sanic and the routes, which the jobs themselves do not need.
    from api.app import make_provider
    from api.gateway_keys import gateway_public_key

    engine = create_engine(settings.database_url)
    sessions = session_factory(engine)
    own_provider = provider is None
    prov = provider if provider is not None else make_provider(settings)
    if secret_env is None:
        # `orz scheduler` on its own: restarting a session (the reconciler) needs its secrets like a start
        # through the API does (the chart mounts the secrets key into the scheduler for this).
        secret_env = SecretService(sessions, SecretsBox.from_settings(settings))
    sched = LifecycleScheduler(settings, sessions, prov, clock=clock,
                               gateway_public_key=gateway_public_key(settings), secret_env=secret_env)
    try:
        sched.start()
        yield sched
    finally:
        try:
            await sched.stop()
        finally:
            if own_provider:
                await prov.close()
            await engine.dispose()


@contextlib.asynccontextmanager
async def running_scheduler(
    settings: Settings,
    *,
    clock: Clock | None = None,
    provider: Provider | None = None,
    secret_env: SecretEnvSource | None = None,
) -> AsyncIterator[LifecycleScheduler | None]:
    """Run the scheduler on the current loop for the block (`orz server`); nothing if run_scheduler is off."""
    if not settings.run_scheduler:
        log.info("scheduler disabled (ORZ_RUN_SCHEDULER=false)")
        yield None
        return
    async with _scheduler(settings, clock=clock, provider=provider, secret_env=secret_env) as sched:
        yield sched


async def run(settings: Settings, stop: Awaitable[object], *, provider: Provider | None = None) -> None:
    """`orz scheduler`: run the jobs until ``stop`` completes (SIGTERM), then hand the lease over."""
    if settings.require_schema_head:
        # Wait (bounded) for `orz admin migrate` rather than crash-looping on a schema not yet there.
        await wait_for_schema(settings.database_url, settings.schema_wait_s)
    async with _scheduler(settings, clock=None, provider=provider, secret_env=None):
        metrics.count_tasks(asyncio.get_running_loop())
        await stop
