"""The web door's metrics, full stack (`orz server`, a LocalProvider runner in tmux, a WebSocket client):
a browser attach moves orz_active_sessions{door="web"} 0 -> 1 -> 0 and counts the attach; a bad
token counts as an auth failure of the websocket method."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.gateway.test_web_attach import Screen, ws_url
from tests.support import free_port
from tests.web_platform import NEEDS, WebPlatform, start_platform

pytestmark = [pytest.mark.integration, NEEDS]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebPlatform]:
    yield from start_platform(tmp_path_factory.mktemp("webmetrics"), ORZ_API_METRICS_PORT=str(free_port()))


async def scrape(platform: WebPlatform) -> Samples:
    # orz server: the API's metrics listener carries the embedded gateway's metrics too.
    metrics_url = f"http://127.0.0.1:{platform.env['ORZ_API_METRICS_PORT']}"
    async with httpx.AsyncClient(base_url=metrics_url, timeout=5) as http:
        text = (await http.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def until(platform: WebPlatform, name: str, labels: dict[str, str], wanted: float) -> Samples:
    for _ in range(150):
        samples = await scrape(platform)
        if samples.get(key(name, **labels)) == wanted:
            return samples
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}{labels} never reached {wanted}: {samples.get(key(name, **labels))}")


async def test_browser_attach_moves_web_sessions_0_1_0_and_counts(platform: WebPlatform) -> None:
    sid = platform.new_session("echo hi; exec bash --norc --noprofile")
    web = {"door": "web"}
    before = await until(platform, "orz_active_sessions", web, 0)
    ok = key("orz_attaches_total", door="web", result="ok")
    token = str(platform.grant(sid)["token"])
    async with connect(ws_url(platform, sid, token), open_timeout=10) as ws:
        await Screen(ws).until("hi")
        during = await until(platform, "orz_active_sessions", web, 1)
        assert during[ok] == before[ok] + 1
        assert during[key("orz_attach_latency_seconds_count", door="web")] == before[
            key("orz_attach_latency_seconds_count", door="web")] + 1
    after = await until(platform, "orz_active_sessions", web, 0)
    assert after[key("orz_bytes_proxied_total", direction="out")] > before[key("orz_bytes_proxied_total",
                                                                                direction="out")]
    # A forged token: refused before the upgrade, counted as a websocket auth failure.
    failures = key("orz_auth_failures_total", method="websocket", reason="invalid")
    with pytest.raises(InvalidStatus):
        async with connect(ws_url(platform, sid, "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"), open_timeout=10):
            pass
    assert (await scrape(platform)).get(failures, 0) == before.get(failures, 0) + 1
