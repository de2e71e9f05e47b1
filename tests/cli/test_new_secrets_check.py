"""`orz cloud new` refuses, before a session is made, a repository whose .orz/cloud.yaml uses ${KEY}s that
no secret named with --secrets provides, where it can read the file here: a local checkout or --repo PATH."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli.conftest import LiveApi, Orz
from tests.cli.test_cloud_commands import create
from tests.conftest import Tenant

USES_SECRET = 'version: "1.0"\nenv:\n  GH: ${GH_TOKEN}\n  LOG_LEVEL: debug\n'
NO_SECRET = 'version: "1.0"\nenv:\n  LOG_LEVEL: debug\n'


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo), *args],
                   check=True, capture_output=True)


def checkout(tmp_path: Path, cloud_yaml: str) -> tuple[Path, Path]:
    """A clone on main with an origin (a bare repository here), nothing fetched yet; (work, origin)."""
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    git(work, "remote", "add", "origin", str(origin))
    (work / ".orz").mkdir()
    (work / ".orz" / "cloud.yaml").write_text(cloud_yaml)
    git(work, "add", "-A")
    git(work, "commit", "-qm", "init")
    return work, origin


def refused(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)  # EXIT_USAGE: the input, not the server
    assert done.stdout == "" and "Traceback" not in done.stderr
    problem, verdict = done.stderr.strip().splitlines()[-2:]  # after any note (a local repository's URL)
    assert problem == ("orz: .orz/cloud.yaml:3: env.GH: ${GH_TOKEN} is not one of this session's secrets (it has "
                       "none: no --secrets were named); create one with the key GH_TOKEN (orz cloud "
                       "secrets create NAME --data GH_TOKEN=...) and start the session with it: "
                       "orz cloud new --secrets NAME"), problem
    assert verdict.startswith("orz: no session created: it would fail at start (checked "), verdict
    for fragment in fragments:
        assert fragment in verdict, verdict


def test_new_from_a_checkout_names_the_missing_secret_before_creating(orz: Orz, live_api: LiveApi,
                                                                      logged_in: Tenant, tmp_path: Path) -> None:
    work, _ = checkout(tmp_path, USES_SECRET)
    # Never fetched: only this checkout's own file can stand in for origin's, and the message says so.
    refused(orz("cloud", "new", "--no-attach", "--program", "bash", cwd=work / ".orz"),
            f"this checkout's .orz/cloud.yaml ({work}/.orz/cloud.yaml)",
            "the session clones main from origin, whose copy may differ from this one")
    assert live_api.provider.specs == {}

    made = orz("cloud", "secrets", "create", "gh", "--data", "OTHER=x")
    assert made.returncode == 0, made.stderr
    refused_keys = orz("cloud", "new", "--no-attach", "--secrets", "gh", cwd=work)
    assert refused_keys.returncode == 2 and "(its secrets have the keys OTHER)" in refused_keys.stderr
    assert orz("cloud", "secrets", "create", "gh", "--data", "GH_TOKEN=x", "--replace").returncode == 0
    sid = create(orz, "--secrets", "gh", cwd=work)
    assert live_api.provider.specs[sid].branch == "main"

    # Pushed and fetched: origin/main is what is checked, and a local edit that drops the reference does not
    # hide it (the session gets origin's file).
    git(work, "push", "-q", "origin", "main")
    git(work, "fetch", "-q", "origin")
    (work / ".orz" / "cloud.yaml").write_text(NO_SECRET)
    refused(orz("cloud", "new", "--no-attach", cwd=work),
            ".orz/cloud.yaml of origin/main as this checkout last fetched",
            "origin may have changed since (git fetch)",
            "this checkout's own copy differs and is not what the session gets")
    assert list(live_api.provider.specs) == [sid]


def test_new_with_a_local_repo_path_reads_the_branch_it_clones(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                               tmp_path: Path) -> None:
    work, _ = checkout(tmp_path, USES_SECRET)
    git(work, "checkout", "-q", "-b", "plain")
    (work / ".orz" / "cloud.yaml").write_text(NO_SECRET)
    git(work, "commit", "-qam", "no secrets on this branch")
    refused(orz("cloud", "new", "--no-attach", "--repo", str(work), "--branch", "main", cwd=tmp_path),
            f".orz/cloud.yaml as committed on main in {work}")
    assert live_api.provider.specs == {}
    # The branch checked out here needs no secret: created.
    sid = create(orz, "--repo", str(work), cwd=tmp_path)
    assert live_api.provider.specs[sid].repo_url == work.as_uri()
    # A repository only the server can read is not checked here: the session reports it when it starts.
    other = create(orz, "--repo", "https://example.com/r.git", "--branch", "main", cwd=work)
    assert live_api.provider.specs[other].repo_url == "https://example.com/r.git"


def test_new_with_a_local_repo_path_refuses_what_the_clone_would_fail_on(orz: Orz, live_api: LiveApi,
                                                                         logged_in: Tenant, tmp_path: Path) -> None:
    work, origin = checkout(tmp_path, NO_SECRET)

    def refused_usage(*args: str) -> str:
        done = orz("cloud", "new", "--no-attach", *args, cwd=tmp_path)
        assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("orz: "), done.stderr
        return done.stderr.strip()

    # A branch the repository lacks: the server's clone would fail at start.
    assert refused_usage("--repo", str(work), "--branch", "nosuch") == (
        f"orz: --repo {work} has no branch nosuch (its branches: main)")
    # A bare repository whose HEAD names a branch nobody pushed (git init --bare makes master, main was pushed):
    # the clone would check out nothing and the session would run in an empty workspace.
    git(work, "push", "-q", "origin", "main")
    subprocess.run(["git", "-C", str(origin), "symbolic-ref", "HEAD", "refs/heads/master"], check=True)
    assert refused_usage("--repo", str(origin)) == (
        f"orz: --repo {origin}: its HEAD names master, which has no commits, so the session would start with an "
        "empty workspace; name a branch with --branch (its branches: main)")
    # A directory inside a clone is no repository to clone: its top is named.
    assert refused_usage("--repo", str(work / ".orz")) == (
        f"orz: --repo {work / '.orz'}: not a git repository; did you mean --repo {work}?")
    assert live_api.provider.specs == {}  # nothing half-made

    sid = create(orz, "--repo", str(origin), "--branch", "main", cwd=tmp_path)
    assert live_api.provider.specs[sid].branch == "main"
