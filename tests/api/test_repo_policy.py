"""repo_url rules (issue 16/17): no loopback, link-local or private hosts and no file:// outside the
admin's directories (never the data dir), the same on the local and the Kubernetes provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.db.models import Instance
from api.instances.providers.base import Provider
from api.instances.providers.local import LocalProvider
from api.instances.repo_policy import FILE_REFUSED, HOST_REFUSED, RepoUrlRefused, check_repo_url
from api.instances.service import InstanceService
from api.settings import Settings
from tests.api.lifecycle_support import principal
from tests.conftest import make_tenant
from tests.support import free_port

# DNS stand-in: names a test resolves, so no test depends on the network's resolver.
TABLE = {
    "git.example.com": ["93.184.215.14"],
    "intranet.corp": ["10.1.2.3"],
    "rebind.example": ["93.184.215.14", "127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
}


async def table_resolver(host: str) -> list[str]:
    return TABLE.get(host, [])


def settings_for(tmp_path: Path, **extra: str) -> Settings:
    return Settings(**{"data_dir": tmp_path / "data", "repo_file_dirs": "", "repo_allow_hosts": "", **extra})


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/x.git", "http://127.0.0.1:5432/", "https://localhost/x.git", "git://[::1]/x",
    "https://[::ffff:127.0.0.1]/x", "ssh://git@10.0.0.5/x.git", "git@192.168.1.10:team/x.git",
    "https://169.254.169.254/latest", "https://metadata.example/x", "https://intranet.corp/x.git",
    "https://rebind.example/x.git", "https://0.0.0.0/x", "https://100.64.1.1/x", "https://api.localhost/x",
    # IPv6 forms carrying a private IPv4 address (NAT64, 6to4, IPv4-compatible) and local-use ranges
    # Python's table calls global.
    "https://[64:ff9b::a9fe:a9fe]/latest", "https://[64:ff9b::10.1.2.3]/x.git", "https://[2002:a00:1::1]/x",
    "https://[::7f00:1]/x", "https://[::127.0.0.1]/x", "https://[64:ff9b:1::a00:1]/x", "https://[fec0::1]/x",
])
async def test_non_public_hosts_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(RepoUrlRefused) as refused:
        await check_repo_url(url, settings_for(tmp_path), table_resolver)
    assert refused.value.detail == HOST_REFUSED and refused.value.status == 422


async def test_numeric_host_forms_are_resolved_like_git_would(tmp_path: Path) -> None:
    # 2130706433 is 127.0.0.1 to getaddrinfo (and so to git): the real resolver must catch it.
    with pytest.raises(RepoUrlRefused):
        await check_repo_url("https://2130706433/x.git", settings_for(tmp_path))


@pytest.mark.parametrize("url", ["https://git.example.com/team/x.git", "git@git.example.com:team/x.git",
                                 "https://93.184.215.14/x.git", "https://[64:ff9b::5db8:d70e]/x.git",
                                 "https://[2002:5db8:d70e::1]/x.git"])
async def test_public_hosts_pass(tmp_path: Path, url: str) -> None:
    await check_repo_url(url, settings_for(tmp_path), table_resolver)


async def test_the_admin_allows_hosts_by_name_or_network(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, repo_allow_hosts="intranet.corp, 192.168.1.0/24")
    await check_repo_url("https://intranet.corp/x.git", settings, table_resolver)
    await check_repo_url("git@192.168.1.10:team/x.git", settings, table_resolver)
    with pytest.raises(RepoUrlRefused):
        await check_repo_url("https://10.9.9.9/x.git", settings, table_resolver)


async def test_the_answer_is_the_same_for_an_open_and_a_closed_port(tmp_path: Path) -> None:
    accepted = 0

    def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    open_port = server.sockets[0].getsockname()[1]
    closed_port = free_port()
    answers = []
    try:
        for port in (open_port, closed_port):
            with pytest.raises(RepoUrlRefused) as refused:
                await check_repo_url(f"http://127.0.0.1:{port}/x.git", settings_for(tmp_path), table_resolver)
            answers.append(refused.value.to_problem())
    finally:
        server.close()
        await server.wait_closed()
    assert answers[0] == answers[1]
    assert accepted == 0  # nothing was connected to


async def test_file_urls_only_from_allowed_dirs_and_never_the_data_dir(tmp_path: Path) -> None:
    allowed = tmp_path / "repos"
    (allowed / "x.git").mkdir(parents=True)
    settings = Settings(data_dir=tmp_path / "data", repo_file_dirs=str(tmp_path))
    await check_repo_url(f"file://{allowed}/x.git", settings)
    for url in (f"file://{tmp_path}/data/sessions/other/workspace",
                f"file://{allowed}/../data/sessions/other/workspace",  # .. does not get out
                "file:///etc", "file:///root/project"):
        with pytest.raises(RepoUrlRefused) as refused:
            await check_repo_url(url, settings)
        assert refused.value.detail == FILE_REFUSED
    with pytest.raises(RepoUrlRefused):  # nothing allowed by default
        await check_repo_url(f"file://{allowed}/x.git", settings_for(tmp_path))


# -- the same rule on both providers' create path -------------------------------------------------

@pytest.fixture(params=["local", "kubernetes"])
async def any_provider(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Provider]:
    if request.param == "local":
        yield LocalProvider(settings)
        return
    from api.instances.providers.kubernetes.provider import KubernetesProvider
    from tests.k8s.fake_apiserver import FakeApiServer

    with FakeApiServer() as server:
        api = k8s.ApiClient(k8s.Configuration(host=server.url))
        prov = KubernetesProvider(Settings(k8s_namespace="orz-sessions"), api, request_timeout_s=10.0,
                                  watch_timeout_s=1, sync_timeout_s=3.0, terminate_wait_s=1.0)
        prov.fake_server = server  # type: ignore[attr-defined]
        try:
            yield prov
        finally:
            await prov.close()
            api.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:5432/x.git", "https://intranet.corp/x.git",
                                 "file://{data}/sessions/a-1/workspace"])
async def test_create_refuses_before_anything_exists(
        settings: Settings, sessions: async_sessionmaker[AsyncSession], any_provider: Provider, url: str) -> None:
    service = InstanceService(settings, sessions, any_provider, resolve_host=table_resolver,
                              gateway_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGateway gateway")
    who = await principal(sessions, "acme")
    with pytest.raises(RepoUrlRefused):
        await service.create(who, schemas.InstanceCreate(repo_url=url.format(data=settings.data_dir)))
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Instance)) == 0
    if isinstance(any_provider, LocalProvider):
        assert not settings.sessions_dir.exists() or not any(settings.sessions_dir.iterdir())
    else:
        assert not [m for m, plural in any_provider.fake_server.cluster.requests if m == "POST"]  # type: ignore[attr-defined]


async def test_the_api_answers_422_problem_json(app, sessions: async_sessionmaker[AsyncSession],
                                                settings: Settings) -> None:
    tenant = await make_tenant(sessions, "acme")
    url = f"file://{settings.data_dir}/sessions/other/workspace"
    _, resp = await app.asgi_client.post("/v1/instances", json={"repo_url": url}, headers=tenant.headers)
    assert resp.status == 422
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json["code"] == "repo_url_refused" and "ORZ_REPO_FILE_DIRS" in resp.json["detail"]
