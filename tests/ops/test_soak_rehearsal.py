"""The soak's Kubernetes target (hack/soak.py --target rehearsal) in the parts that run without the
rehearsal's cluster: the fixture its git server Pod serves, the chart values that set the soak's clock,
the faults it offers, and how it finds a container's main process. With `--access api` its users go through
port-forwards: checked here against the rehearsal's API server with Pods stood in for by HTTP servers.
The whole target runs with `make soak-rehearsal` (root, minutes; SOAK_REHEARSAL_ACCESS=api)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from rehearsal.apiserver import FakeApiServer
from rehearsal.kube import KubeAccess
from rehearsal.store import Store
from tests.k8s.helm import helm_binary
from tests.support import ROOT


@pytest.fixture(scope="module", autouse=True)
def hack_on_path() -> Iterator[None]:
    sys.path.insert(0, str(ROOT / "hack"))
    yield
    sys.path.remove(str(ROOT / "hack"))


def test_the_git_server_serves_the_soaks_fixture_without_a_service(tmp_path: Path) -> None:
    """The script the git server Pod runs makes a repository whose cloud.yaml has the init, onAttach and
    secret the users check, and no redis service (the rehearsal has no image for it)."""
    import soak_rehearsal

    from runner.cloud_config import load

    script = soak_rehearsal.git_script(soak_rehearsal.CLOUD_YAML_NO_SERVICES)
    # The Pod's /srv is an emptyDir: here a temporary directory; git daemon is not started.
    script = script.replace("/srv", str(tmp_path)).replace("exec git daemon", "echo git daemon")
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tmp_path / "git" / "fixture.git"), str(clone)], check=True)
    config = load((clone / ".orz" / "cloud.yaml").read_text())
    assert "init ran" in (config.setup.init or "") and "attached" in (config.setup.onAttach or "")
    assert "SOAK_SECRET" in config.env and config.services == {}


def test_the_soak_values_set_its_clock_on_every_component(tmp_path: Path) -> None:
    """helm template with the rehearsal's values and the soak's: the short idle timeout, reaper and lease,
    and the larger quota reach the Pods, and the steps' git server is still allowed."""
    import soak_rehearsal

    values = tmp_path / "soak.yaml"
    values.write_text(yaml.safe_dump(soak_rehearsal.soak_values(17)))
    done = subprocess.run([str(helm_binary()), "template", "orz", str(ROOT / "charts" / "orzbob-cloud"),
                           "-n", "orz-system",
                           "-f", str(ROOT / "hack" / "rehearsal-values.yaml"), "-f", str(values)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    envs = {}
    for doc in yaml.safe_load_all(done.stdout):
        if doc and doc.get("kind") == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                envs[container["name"]] = {e["name"]: e.get("value") for e in container.get("env") or []}
    assert envs["api"]["ORZ_PLAN_IDLE_TIMEOUT_S"] == "17" and envs["api"]["ORZ_QUOTA_TEAM"] == "500"
    assert envs["scheduler"]["ORZ_SCHEDULER_LEASE_S"] == "4" and envs["scheduler"]["ORZ_REAP_INTERVAL_S"] == "3"
    assert envs["api"]["ORZ_REPO_ALLOW_HOSTS"] == "git-fixture.orz-system.svc.cluster.local"


def test_the_rehearsal_target_offers_the_faults_kubernetes_has(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import soak

    monkeypatch.setattr(os, "geteuid", lambda: 0)  # stands in for root: parse_args only checks it
    args = soak.parse_args(["--target", "rehearsal", "--profile", "ci"])
    assert args.faults == ["kill-gateway", "kill-api", "kill-scheduler", "kill-runner", "pg-terminate",
                           "client-vanishes"]
    assert (args.seconds, args.users) == (120, 3)
    with pytest.raises(SystemExit):
        soak.parse_args(["--target", "rehearsal", "--faults", "disk-full"])
    assert "unknown faults for --target rehearsal: disk-full" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit):
        soak.parse_args(["--target", "rehearsal"])
    assert "needs root" in capsys.readouterr().err


def test_users_reach_the_chart_by_port_forward_only_with_access_api(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import soak

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert soak.parse_args(["--target", "rehearsal"]).access == "direct"
    assert soak.parse_args(["--target", "rehearsal", "--access", "api"]).access == "api"
    with pytest.raises(SystemExit):
        soak.parse_args(["--access", "api"])  # the embedded services have no cluster to forward through
    assert "--access api needs --target rehearsal" in capsys.readouterr().err


class PodPort:
    """A Pod's named port stood in for by an HTTP server on 127.0.0.1 that answers with the Pod's name."""

    def __init__(self, pod: str) -> None:
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pod.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeApiServer, KubeAccess]]:
    """The rehearsal's API server with the chart's namespace, and the soak's view of it (a kubeconfig)."""
    from rehearsal import steps

    with FakeApiServer(store=Store(require_namespaces=True)) as server:
        server.store.create("namespaces", "", {"metadata": {"name": steps.NS}})
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: c, cluster: {{server: '{server.url}'}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n")
        access = KubeAccess(kubeconfig, Path("/nonexistent/helm"), tmp_path)
        try:
            yield server, access
        finally:
            access.close()


def test_with_access_api_every_user_connection_is_forwarded_to_a_ready_pod(
        tmp_path: Path, cluster: tuple[FakeApiServer, KubeAccess]) -> None:
    """The CLI's and REST clients' API URL, the ssh address the chart tells users and the browser door
    are local port-forwards to the chart's Pods; a gateway that is no longer Ready (killed -9, restarting)
    gets none of the new connections, which go to the other replica."""
    import soak_rehearsal

    from rehearsal import steps

    server, access = cluster
    ports: list[PodPort] = []

    def pod(name: str, component: str, *port_names: str) -> None:
        stand_ins = {n: PodPort(f"{name}/{n}") for n in port_names}
        ports.extend(stand_ins.values())
        server.store.create("pods", steps.NS, {
            "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": steps.RELEASE,
                                                  "app.kubernetes.io/component": component}},
            "spec": {"containers": [{"name": component, "image": "x", "ports": [
                {"name": n, "containerPort": p.port} for n, p in stand_ins.items()]}]}})
        server.set_pod_phase(steps.NS, name, "Running", "127.0.0.1", conditions=[{"type": "Ready", "status": "True"}])

    pod("api-a", "api", "http")
    pod("gateway-a", "gateway", "ssh", "web")
    pod("gateway-b", "gateway", "ssh", "web")
    platform = soak_rehearsal.RehearsalPlatform(tmp_path, access_mode="api")
    platform.edge = soak_rehearsal.user_edge(access, "api", steps.VALUES)
    try:
        assert platform.api_url.startswith("http://127.0.0.1:") and platform.web_url.startswith("http://127.0.0.1:")
        with httpx.Client(timeout=20) as user:
            def reached(url: str) -> str:
                return user.get(url, headers={"Connection": "close"}).text

            assert reached(f"{platform.api_url}/v1/me") == "api-a/http"
            # What the chart is told to publish: the forwarders' own addresses.
            values = dict(v.split("=", 1) for v in platform.edge.values if "=" in v)
            assert values["config.publicApiUrl"] == platform.api_url
            ssh = f"http://{values['config.publicSshHost']}:{values['config.publicSshPort']}/"
            assert {reached(ssh) for _ in range(2)} == {"gateway-a/ssh", "gateway-b/ssh"}
            assert values["config.publicWebUrl"] == platform.web_url.replace("http", "ws", 1)
            assert {reached(platform.web_url) for _ in range(2)} == {"gateway-a/web", "gateway-b/web"}
            server.set_pod_phase(steps.NS, "gateway-a", "Running", "127.0.0.1",
                                 conditions=[{"type": "Ready", "status": "False"}])
            assert {reached(ssh) for _ in range(3)} == {"gateway-b/ssh"}
            assert {reached(platform.web_url) for _ in range(3)} == {"gateway-b/web"}
    finally:
        platform.edge.close()
        for stand_in in ports:
            stand_in.close()


def test_with_access_direct_users_reach_the_load_balancers(tmp_path: Path,
                                                           cluster: tuple[FakeApiServer, KubeAccess]) -> None:
    import soak_rehearsal

    from rehearsal import steps

    platform = soak_rehearsal.RehearsalPlatform(tmp_path)
    platform.edge = soak_rehearsal.user_edge(cluster[1], platform.access_mode, steps.VALUES)
    assert (platform.api_url, platform.web_url) == (f"http://{steps.API_LB}", f"http://{steps.GATEWAY_LB}:443")
    assert not platform.edge.forwarders and platform.edge.values == ["-f", str(steps.VALUES)]


def test_a_containers_main_process_is_found_below_its_init() -> None:
    """PID 1 of a container may be an init; the process tree reaches the program it started."""
    import soak_rehearsal

    init = subprocess.Popen(["sh", "-c", "python3 -c 'import time; x = bytearray(64 << 20); time.sleep(30)' & wait"])
    try:
        deadline = time.monotonic() + 10
        tree: list[int] = []
        while time.monotonic() < deadline:
            tree = soak_rehearsal.process_tree(init.pid)
            if len(tree) == 2 and (soak_rehearsal.rss_kib(tree[1]) or 0) > 60_000:
                break
            time.sleep(0.1)
        assert tree[0] == init.pid and len(tree) == 2
        assert max(tree, key=lambda p: soak_rehearsal.rss_kib(p) or 0) == tree[1]
    finally:
        for pid in soak_rehearsal.process_tree(init.pid)[::-1]:
            os.kill(pid, 9)
        init.wait()
