"""The current directory's git origin and branch, the defaults of `orz cloud new`."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class RepoInfo:
    url: str | None
    branch: str | None
    stripped_credentials: bool = False  # origin named a user or token, left out of url


def without_credentials(url: str) -> tuple[str, bool]:
    """An http(s)/git:// URL without its user name and password (a token, for GitHub and GitLab), and
    whether there was one; other URLs as they are (ssh's `git@` is no credential)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "git") or "@" not in parts.netloc:
        return url, False
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])), True


def _git(cwd: Path, *args: str, strip: bool = True) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10,
                              check=False, errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = done.stdout.strip() if strip else done.stdout
    return out if done.returncode == 0 and out else None


def git_toplevel(cwd: Path) -> Path | None:
    top = _git(cwd, "rev-parse", "--show-toplevel")
    return Path(top) if top else None


def has_ref(repo: Path, ref: str) -> bool:
    return _git(repo, "rev-parse", "--verify", "--quiet", ref) is not None


def file_at(repo: Path, ref: str, path: str) -> str | None:
    """A file's text as committed at ``ref`` (path from the repository's root), or None."""
    return _git(repo, "show", f"{ref}:{path}", strip=False)


def as_clone_url(remote: str, cwd: Path) -> str:
    """A remote as the API accepts it: local paths become file:// URLs (the API refuses bare paths)."""
    if "://" in remote or ("@" in remote and ":" in remote):
        return remote
    path = Path(remote)
    if not path.is_absolute():
        path = (cwd / path).resolve()
    return path.as_uri()


def is_local_path(repo: str) -> bool:
    """`--repo ../app` or `--repo ~/src/app`: a directory here rather than a URL."""
    if "://" in repo or ("@" in repo and ":" in repo.split("/", 1)[0]):
        return False
    return Path(repo).expanduser().exists()


def names_a_path(repo: str) -> bool:
    """`/src/app`, `./app`, `../app`, `~/app`: written as a path, whether or not it exists."""
    return "://" not in repo and repo.startswith(("/", "./", "../", "~"))


def _branches(repo: Path) -> list[str]:
    listed = _git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads")
    return listed.splitlines() if listed else []


def local_clone_problem(path: Path, branch: str | None) -> str | None:
    """Why a session cloning the local repository ``path`` (at ``branch``, else its HEAD) would fail or
    start empty, or None; said before the session is made, since the server's clone only fails at start."""
    resolved = path.resolve()
    git_dir = _git(resolved, "rev-parse", "--absolute-git-dir")
    if git_dir is None or not ((resolved / ".git").exists() or Path(git_dir) == resolved):
        top = git_toplevel(resolved) if git_dir else None
        hint = f"; did you mean --repo {top}?" if top else " (a clone's top directory, or a bare repository)"
        return f"--repo {path}: not a git repository{hint}"
    branches = _branches(resolved)
    listed = ", ".join(branches[:10]) + (", ..." if len(branches) > 10 else "") if branches else "none"
    if branch:
        if not (has_ref(resolved, f"refs/heads/{branch}") or has_ref(resolved, f"refs/tags/{branch}")):
            return f"--repo {path} has no branch {branch} (its branches: {listed})"
    elif branches and not has_ref(resolved, "HEAD^{commit}"):
        head = _git(resolved, "symbolic-ref", "--quiet", "--short", "HEAD") or "HEAD"
        return (f"--repo {path}: its HEAD names {head}, which has no commits, so the session would start with an "
                f"empty workspace; name a branch with --branch (its branches: {listed})")
    return None


def local_repo_refused(url: str) -> str:
    """Why the server refused a local repository, and how to allow it."""
    parent = Path(url.removeprefix("file://")).parent
    return (f"the server does not clone {url}: it clones local paths only from the directories its admin "
            f"lists in ORZ_REPO_FILE_DIRS (never from its data directory). On your own orz server, start it "
            f"with ORZ_REPO_FILE_DIRS={parent} (e.g. ORZ_REPO_FILE_DIRS={parent} make dev); otherwise push the "
            "repository and pass its URL")


def current_repo(cwd: Path | None = None) -> RepoInfo:
    """origin's URL and the checked-out branch (None for each when absent or detached)."""
    where = cwd or Path.cwd()
    origin = _git(where, "remote", "get-url", "origin")
    branch = _git(where, "symbolic-ref", "--quiet", "--short", "HEAD")
    if not origin:
        return RepoInfo(url=None, branch=branch)
    url, stripped = without_credentials(as_clone_url(origin, where))
    return RepoInfo(url=url, branch=branch, stripped_credentials=stripped)
