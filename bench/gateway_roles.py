"""Processes the gateway benchmark starts: the gateway (with a stub API) and an idle runner stand-in.

Each runs in its own process so its RSS and CPU are its own:
    python -m bench.gateway_roles --serve-gateway DATA_DIR HOST PORT HOST_KEY [--upstream-user U] [--uvloop]
        [--no-fast-path] [--tracemalloc OUT]
        (PORT and HOST_KEY "-": read as {"port": N, "host_key": KEY} from stdin once the gateway started)
    python -m bench.gateway_roles --serve-idle-runner HOST_KEY_FILE
    python -m bench.gateway_roles --serve-runner-endpoint STATE_DIR WORKSPACE GATEWAY_PUBLIC_KEY [--uvloop]
        [--no-fast-path]
Each prints {"port": N} once listening (the runner endpoint adds "host_key") and stops on SIGTERM. With
--tracemalloc the gateway traces its heap from then on and writes what grew to OUT on SIGUSR1
(bench/heap_profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import asyncssh

from api.schemas import AccessCheck, AccessCheckReply, AttachEventIn, AuthorizeReply, AuthorizeRequest, Route
from api.settings import Settings

# One certificate serves the whole run (which can outlast the default 5 minutes); the gateway refuses
# certificates that live longer than its cert_ttl_s, so both sides use this lifetime.
CERT_TTL_S = 3600


class StubApi:
    """Stands in for the API client: every authorize succeeds with a fixed route; no access is withdrawn."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def authorize(self, req: AuthorizeRequest) -> AuthorizeReply:
        return AuthorizeReply(session_id=req.session_id, user_id=req.user_id, state="running", mode="rw",
                              route=self.route)

    async def attach_event(self, body: AttachEventIn) -> None:
        return None

    async def check_access(self, body: AccessCheck) -> AccessCheckReply:
        return AccessCheckReply(revoked=[])

    async def aclose(self) -> None:
        return None


async def serve_gateway(data_dir: Path, route: Route, upstream_user: str | None, fast_path: bool = True,
                        tracemalloc_out: Path | None = None) -> None:
    import gateway.server as gw_server

    if upstream_user:
        original = gw_server.connect_upstream

        async def as_user(route: Route, mode: str, key: asyncssh.SSHKey, **kw: Any) -> Any:
            return await original(route, upstream_user, key, **kw)

        gw_server.connect_upstream = as_user  # type: ignore[assignment]
    # The held-sessions figure opens every session from one address at once, which the pre-auth limits
    # (10 per source, 256 in all, like sshd's MaxStartups) would refuse: lift them for the benchmark.
    settings = Settings(data_dir=data_dir, ssh_port=0, gateway_web_port=0, gateway_fast_path=fast_path,
                        cert_ttl_s=CERT_TTL_S, gateway_preauth_per_source=100_000, gateway_preauth_total=100_000)
    stub = StubApi(route)
    gw = gw_server.Gateway(settings, api=stub)  # type: ignore[arg-type]
    await gw.start()
    if route.port == 0:  # started beside its upstream (bench.gateway.gateway_to): told it on stdin
        told = json.loads(await asyncio.to_thread(sys.stdin.readline))
        stub.route = Route(host=route.host, port=int(told["port"]), host_key=told["host_key"])
    from cli.services import freeze_startup_heap

    freeze_startup_heap()  # as `orz gateway` does once started
    if tracemalloc_out is not None:
        from bench import heap_profile

        base = heap_profile.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, heap_profile.write, base, tracemalloc_out)
    print(json.dumps({"port": gw.port}), flush=True)
    try:
        await _until_sigterm()
    finally:
        await gw.close()


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


class _IdleRunner(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True  # bench only: loopback, throwaway process


async def serve_idle_runner(host_key_file: Path) -> None:
    """A runner stand-in whose pty shells print a prompt and then sit idle."""

    async def shell(process: asyncssh.SSHServerProcess[bytes]) -> None:
        process.stdout.write(b"ready\r\n")
        while await process.stdin.read(4096):
            pass
        process.exit(0)

    acceptor = await asyncssh.listen("127.0.0.1", 0, server_factory=_IdleRunner,
                                     server_host_keys=[str(host_key_file)], process_factory=shell,
                                     encoding=None, line_editor=False, config=None,
                                     encryption_algs=["aes128-gcm@openssh.com"])
    print(json.dumps({"port": acceptor.get_port()}), flush=True)
    await _until_sigterm()
    acceptor.close()


async def serve_runner_endpoint(state_dir: Path, workspace: Path, gateway_public_key: str,
                                fast_path: bool = True) -> None:
    """The runner's own endpoint (runner/sshd.py) on a tmux session, as runner/main.py wires it.

    Only the clone, the heartbeats and the agent watch are left out: the benchmark times attaching,
    typing, copying and holding sessions, which go through this endpoint and tmux alone. The pane's
    program is whatever the benchmark respawns it with (`tmux respawn-pane`); it starts as `sleep`.
    """
    import os

    from runner.activity import Activity
    from runner.main import login_shell
    from runner.sshd import Endpoint, SessionHooks
    from runner.tmux import Tmux

    env = {"PATH": os.environ["PATH"], "HOME": str(workspace), "LANG": "C.UTF-8", "SHELL": login_shell()}
    tmux = Tmux(state_dir / "tmux.sock")
    program = ["sleep", "infinity"]
    await tmux.start(program, cwd=workspace, env=env)
    ready = asyncio.Event()
    ready.set()

    async def ensure_program() -> None:
        await tmux.ensure(program, cwd=workspace, env=env)  # one `tmux display-message` per attach, as the runner

    hooks = SessionHooks(workspace=workspace, shell=login_shell(), tmux=tmux, activity=Activity(),  # nosec B604
                         env=lambda: dict(env), ensure_program=ensure_program, ready=ready, login="bench")
    endpoint = Endpoint(hooks, gateway_public_key, "127.0.0.1", 0, fast_path=fast_path)
    port = await endpoint.start()
    print(json.dumps({"port": port, "host_key": endpoint.host_public_key}), flush=True)
    try:
        await _until_sigterm()
    finally:
        await endpoint.close()
        await tmux.kill_server()


def raise_fd_limit(wanted: int = 65536) -> None:
    """Room for 10,000 held sessions: the gateway holds two sockets per session (client and runner)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((max(wanted, hard), max(wanted, hard)), (hard, hard)):  # raising the hard limit needs root
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            return
        except (ValueError, OSError):
            continue


def cli() -> None:
    raise_fd_limit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-gateway", nargs=4, metavar=("DATA_DIR", "HOST", "PORT", "HOST_KEY"))
    parser.add_argument("--upstream-user")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                        help="every packet through asyncssh's channels (gateway/splice.py off; for the gateway "
                             "or the runner endpoint)")
    parser.add_argument("--tracemalloc", type=Path, metavar="OUT",
                        help="trace the gateway's heap; on SIGUSR1 write what grew to OUT (bench/heap_profile.py)")
    parser.add_argument("--serve-idle-runner", metavar="HOST_KEY_FILE")
    parser.add_argument("--serve-runner-endpoint", nargs=3, metavar=("STATE_DIR", "WORKSPACE", "GATEWAY_KEY"))
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        if args.serve_gateway:
            data_dir, host, port, host_key = args.serve_gateway
            # PORT and HOST_KEY "-": one JSON line on stdin gives them ({"port", "host_key"}) once started.
            upstream = Route(host=host, port=0, host_key="-") if port == "-" else Route(host=host, port=int(port),
                                                                                        host_key=host_key)
            asyncio.run(serve_gateway(Path(data_dir), upstream,
                                      args.upstream_user, args.fast_path, args.tracemalloc))
        elif args.serve_idle_runner:
            asyncio.run(serve_idle_runner(Path(args.serve_idle_runner)))
        elif args.serve_runner_endpoint:
            state_dir, workspace, gateway_key = args.serve_runner_endpoint
            asyncio.run(serve_runner_endpoint(Path(state_dir), Path(workspace), gateway_key, args.fast_path))


if __name__ == "__main__":
    cli()
