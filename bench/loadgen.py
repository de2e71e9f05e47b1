"""A small HTTP/1.1 keep-alive load generator (asyncio, raw sockets) for the API benchmarks.

Python HTTP clients cost more per request than the server under test; writing requests on raw
keep-alive connections keeps the client's share small, and it runs in its own process.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    # The finite request supply ran out before the time was up (give the run more tenants).
    exhausted: bool = False

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q / 100 * len(data)))]

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.requests, "errors": self.errors, "rps": round(self.rps, 1),
            "p50_ms": round(self.pct(50), 2), "p99_ms": round(self.pct(99), 2),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 2) if self.latencies_ms else float("nan"),
            **({"exhausted": True} if self.exhausted else {}),
        }


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _worker(host: str, port: int, requests: Iterator[bytes], stop_at: float, ok: set[int],
                  out: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            request = next(requests, None)
            if request is None:
                out.exhausted = True
                return
            t0 = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            out.latencies_ms.append((time.perf_counter() - t0) * 1000)
            out.requests += 1
            if status not in ok:
                out.errors += 1
    finally:
        writer.close()


def build_request(method: str, path: str, host: str, token: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {token}",
             "Connection: keep-alive", f"Content-Length: {len(body)}"]
    if body:
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run_load(host: str, port: int, request: bytes | Iterator[bytes], *, concurrency: int, seconds: float,
                   ok: set[int]) -> LoadResult:
    """Send `request` (one, repeated; or each of a finite supply once) on `concurrency` connections."""
    requests = itertools.repeat(request) if isinstance(request, bytes) else request
    result = LoadResult(0, 0, 0.0, [])
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*[_worker(host, port, requests, stop_at, ok, result) for _ in range(concurrency)])
    result.seconds = time.perf_counter() - start
    return result
