"""The soak's Kubernetes target (hack/soak.py --target rehearsal) in the parts that run without the
rehearsal's cluster: the fixture its git server Pod serves, the chart values that set the soak's clock,
the faults it offers, and how it finds a container's main process. The whole target runs with
`make soak-rehearsal` (root, minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

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
