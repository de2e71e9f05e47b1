"""A /metrics listener of a process's own: prometheus-client's threaded HTTP server, shared by the processes
that have no HTTP server of their own for it (the gateway, `orz scheduler`). No metric families live here,
so importing it registers nothing."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


@dataclass
class MetricsServer:
    """A running /metrics listener; ``port`` is the one bound (the asked one may be 0: any free port)."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` on host:port in a daemon thread: a scrape never waits on the process's event loop."""
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd, thread)
