"""Never lose work: what the workspace holds that the origin does not, and the WIP push before a stop.

The WIP commit is made on a scratch index (``git commit-tree``): the user's HEAD, index and files stay as
they were, so a session started again finds its workspace exactly as it left it. The commit goes to the
branch ``orz/<session id>`` on the origin (forced: the branch belongs to the session).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from api.schemas import WORK_FILES_MAX, WorkState
from runner.reaping import reaped

log = logging.getLogger(__name__)

WIP_TIMEOUT_S = 10.0  # inside the provider's stop grace (15 s), with the rest of the shutdown
_FALLBACK_IDENT = {"GIT_AUTHOR_NAME": "orz", "GIT_AUTHOR_EMAIL": "orz@localhost",
                   "GIT_COMMITTER_NAME": "orz", "GIT_COMMITTER_EMAIL": "orz@localhost"}


class GitFailed(Exception):
    pass


def wip_branch(session_id: str) -> str:
    return f"orz/{session_id}"


async def _git(workspace: Path, args: Sequence[str], env: Mapping[str, str], check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git", "-C", str(workspace), *args, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await reaped(proc, proc.communicate())  # the caller's time ran out: leave no git behind
    if check and proc.returncode != 0:
        lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        # A refused push says why on the remote: lines, then only "failed to push some refs".
        said = [ln for ln in lines if ln.startswith(("remote:", "!", "fatal:", "error:"))] or lines
        raise GitFailed("; ".join(said[-3:]) if said else f"git {args[0]} exited with {proc.returncode}")
    return out.decode("utf-8", "replace")


async def scan(workspace: Path, env: Mapping[str, str]) -> WorkState | None:
    """Dirty files and commits on no remote branch; None when the workspace is no git checkout."""
    if not (workspace / ".git").exists():
        return None
    env = {**env, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}  # status must not take index.lock
    try:
        status = await _git(workspace, ["status", "--porcelain", "--untracked-files=normal"], env)
        if (await _git(workspace, ["rev-parse", "--verify", "--quiet", "HEAD"], env, check=False)).strip():
            unpushed = int((await _git(workspace, ["rev-list", "--count", "HEAD", "--not", "--remotes"], env))
                           .strip() or "0")
        else:
            unpushed = 0
    except (GitFailed, ValueError) as exc:
        log.warning("could not read the workspace's git state: %s", exc)
        return None
    lines = [ln for ln in status.splitlines() if ln.strip()]
    # "XY path" (or "XY old -> new"); git quotes a path with unusual characters, so each is one printable line.
    files = [ln[3:][:1024] for ln in lines[:WORK_FILES_MAX]]
    return WorkState(dirty_files=len(lines), files=files, unpushed_commits=unpushed, scanned_at=datetime.now(UTC))


async def save(workspace: Path, session_id: str, env: Mapping[str, str]) -> WorkState | None:
    """Commit everything uncommitted (without moving HEAD) and push it to ``orz/<id>`` on the origin.

    Returns the workspace's state with ``wip_branch``/``wip_commit`` when the push succeeded, or
    ``wip_error`` saying why not. Nothing to save: the plain scan."""
    state = await scan(workspace, env)
    if state is None or (state.dirty_files == 0 and state.unpushed_commits == 0):
        return state
    branch = wip_branch(session_id)
    git_dir = Path((await _git(workspace, ["rev-parse", "--absolute-git-dir"], env)).strip())
    genv = {**env, "GIT_TERMINAL_PROMPT": "0"}
    if not (await _git(workspace, ["config", "user.email"], genv, check=False)).strip():
        genv = {**_FALLBACK_IDENT, **genv}
    try:
        head = (await _git(workspace, ["rev-parse", "--verify", "--quiet", "HEAD"], genv, check=False)).strip()
        commit = head
        if state.dirty_files:
            index = git_dir / "orz-wip-index"
            ienv = {**genv, "GIT_INDEX_FILE": str(index)}
            try:
                await _git(workspace, ["read-tree", *([head] if head else ["--empty"])], ienv)
                await _git(workspace, ["add", "--all", "--", "."], ienv)
                tree = (await _git(workspace, ["write-tree"], ienv)).strip()
            finally:
                index.unlink(missing_ok=True)
            message = (f"WIP: uncommitted work of orz session {session_id}\n\n"
                       f"Saved by orz before the session was stopped or deleted; the workspace's own "
                       f"branch and files were left as they were.\n")
            commit = (await _git(workspace, ["commit-tree", tree, *(["-p", head] if head else []),
                                             "-m", message], genv)).strip()
        await _git(workspace, ["update-ref", "-m", "orz wip", f"refs/orz/{branch}", commit], genv)
        await _git(workspace, ["push", "--quiet", "--no-verify", "origin", f"+{commit}:refs/heads/{branch}"],
                   genv)
    except GitFailed as exc:
        log.warning("could not push the work of %s to %s: %s", session_id, branch, exc)
        return state.model_copy(update={"wip_error": str(exc)[:1024]})
    log.info("pushed the session's work to %s (%s)", branch, commit[:12])
    return state.model_copy(update={"wip_branch": branch, "wip_commit": commit})


async def save_bounded(workspace: Path, session_id: str, env: Mapping[str, str],
                       timeout_s: float = WIP_TIMEOUT_S) -> WorkState | None:
    try:
        async with asyncio.timeout(timeout_s):
            return await save(workspace, session_id, env)
    except TimeoutError:
        log.warning("saving the work of %s took longer than %.0f s; gave up", session_id, timeout_s)
    except (GitFailed, OSError) as exc:
        log.warning("could not save the work of %s: %s", session_id, exc)
    return None
