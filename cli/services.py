"""`orz api|gateway|runner|scheduler|server`: run one service (containers) or all of them (embedded)."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path

import click

from api import log as orz_log
from api.errors import SchemaNotAtHead
from api.settings import Settings, load_settings
from cli.errors import CliError


def _configure_logging(settings: Settings) -> None:
    orz_log.configure(settings.log_level, settings.log_json)


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM, so callers can shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class Signals:
    """SIGINT/SIGTERM counted while in use, so a second one is never the default (abrupt) handler's."""

    def __init__(self) -> None:
        self._received = asyncio.Queue[int]()

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received.put_nowait, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    async def next(self) -> int:
        return await self._received.get()


def _run(coro_factory) -> None:  # type: ignore[no-untyped-def]
    try:
        _event_loop_policy()
        asyncio.run(coro_factory())
    except KeyboardInterrupt:
        pass
    except (OSError, SchemaNotAtHead) as exc:
        raise CliError(str(exc)) from None


def _event_loop_policy() -> None:
    """uvloop when installed (it comes with Sanic): measurably lower echo latency through the gateway."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def freeze_startup_heap() -> None:
    """Take everything alive once a service has started out of the garbage collector's view.

    Otherwise every full collection re-walks all modules, ORM mappers, routes and keys: measured on the
    API as ~55 ms pauses (its p99 latency) that become ~2.5 ms. Start-up garbage is collected first so
    none of it is kept for the life of the process."""
    gc.collect()
    gc.freeze()


@click.command("api")
@click.option("--host", default=None, help="Listen address (ORZ_API_HOST).")
@click.option("--port", type=int, default=None, help="Listen port (ORZ_API_PORT).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes sharing the port (ORZ_API_WORKERS; more than 1 needs ORZ_PROVIDER=kubernetes).")
@click.option("--worker-socket", type=int, default=None, hidden=True)  # set by the workers' supervisor
@click.option("--worker-metrics-socket", type=int, default=None, hidden=True)
def api_cmd(host: str | None, port: int | None, workers: int | None, worker_socket: int | None,
            worker_metrics_socket: int | None) -> None:
    """Run the API alone (for containers; the database must be migrated)."""
    settings = load_settings(api_host=host, api_port=port, api_workers=workers)
    _configure_logging(settings)
    if settings.api_workers > 1 and worker_socket is None:
        from cli.api_workers import supervise

        supervise(settings)
        return

    async def main() -> None:
        import socket

        from api.app import create_app, create_metrics_app
        from api.serve import ApiServer, api_connection_cap

        app = create_app(settings)
        shared = socket.socket(fileno=worker_socket) if worker_socket is not None else None
        server = await ApiServer.start(app, settings.api_host, settings.api_port, sock=shared,
                                       cap=api_connection_cap(settings))
        metrics = None
        if worker_metrics_socket is not None:  # the one worker that answers for all (api/metrics.py sums them)
            metrics = await ApiServer.start(create_metrics_app(app), settings.api_host, 0,
                                            sock=socket.socket(fileno=worker_metrics_socket))
        elif settings.api_metrics_port and worker_socket is None:
            metrics = await ApiServer.start(create_metrics_app(app), settings.api_host, settings.api_metrics_port)
        freeze_startup_heap()
        signalled = asyncio.ensure_future(wait_for_signal())
        gave_up = asyncio.ensure_future(app.ctx.gave_up.wait())
        try:
            await asyncio.wait({signalled, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (signalled, gave_up):
                waiter.cancel()
            if metrics is not None:
                await metrics.stop()
            await server.stop()
        if gave_up.done() and not gave_up.cancelled():
            raise CliError(str(app.ctx.schema_problem))

    _run(main)


@click.command("gateway")
@click.option("--ssh-port", type=int, default=None, help="SSH listen port (ORZ_SSH_PORT).")
@click.option("--web-port", type=int, default=None, help="Web door port (ORZ_GATEWAY_WEB_PORT).")
def gateway_cmd(ssh_port: int | None, web_port: int | None) -> None:
    """Run the SSH (and WebSocket) gateway alone.

    SIGTERM drains it: no new connections, attached users are told, open ones run on for at most
    ORZ_GATEWAY_DRAIN_S seconds (a second SIGTERM or SIGINT ends that early)."""
    settings = load_settings(ssh_port=ssh_port, gateway_web_port=web_port)
    _configure_logging(settings)

    async def main() -> None:
        from gateway.server import serve

        with Signals() as signals:
            async with serve(settings) as gateway:
                freeze_startup_heap()
                await signals.next()
                # Connections keep running through the drain; a second signal or the deadline ends it.
                await gateway.drain(settings.gateway_drain_s, signals.next())

    _run(main)


@click.command("scheduler")
def scheduler_cmd() -> None:
    """Run the scheduler jobs alone (idle reaper, reconciler, purge); one replica acts at a time."""
    settings = load_settings()
    _configure_logging(settings)

    async def main() -> None:
        from api import metrics
        from api.jobs.scheduler import run

        # The scheduler has no HTTP server of its own: its metrics get a listener when asked for.
        server = (metrics.serve(settings.api_host, settings.scheduler_metrics_port, "scheduler")
                  if settings.scheduler_metrics_port else None)
        try:
            await run(settings, stop=wait_for_signal())
        finally:
            if server is not None:
                server.close()

    _run(main)


@click.command("runner")
def runner_cmd() -> None:
    """Run a session's runner (started by a provider, configured by ORZ_RUNNER_SPEC)."""
    from runner.main import main

    # In a pod the runner's stderr is the container log: JSON like every other service. (The runner's
    # own basicConfig then leaves this handler alone; `python -m runner`, used by the local provider,
    # keeps plain lines in the runner.log users read.)
    _configure_logging(load_settings())
    main()


@click.command("server")
@click.option("--host", default=None, help="Address for the API and SSH listeners (default 127.0.0.1).")
@click.option("--api-port", type=int, default=None, help="API port (default 8080).")
@click.option("--ssh-port", type=int, default=None, help="SSH gateway port (default 2222).")
@click.option("--web-port", type=int, default=None, help="Browser terminal / WebSocket port (default 8443).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the database, keys and workspaces live (default ~/.local/share/orzbob).")
def server_cmd(host: str | None, api_port: int | None, ssh_port: int | None, web_port: int | None,
               data_dir: Path | None) -> None:
    """Run the whole platform on this machine: API, gateway, scheduler and local sessions."""
    from cli import server_log
    from cli.server import check_ports, run_server

    settings = load_settings(api_host=host, ssh_host=host, gateway_web_host=host, api_port=api_port,
                             ssh_port=ssh_port, gateway_web_port=web_port, data_dir=data_dir)
    check_ports(settings)
    logs = server_log.configure(settings)

    async def main() -> None:
        async with run_server(settings) as running:
            freeze_startup_heap()
            click.echo(running.banner(logs))
            await wait_for_signal()
            click.echo("orz server: stopping sessions and services...", err=True)

    _run(main)


COMMANDS = [api_cmd, gateway_cmd, scheduler_cmd, runner_cmd, server_cmd]
