"""`orz cloud new|list|attach|kill|diff|stop|start|logs|status`: the session commands."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from api import schemas
from api.client import ApiError
from cli import attach as attaching
from cli import keys, output, ssh_config
from cli.cloud_yaml_check import from_checkout, from_local_repo, refuse_missing_secrets
from cli.completion import complete_session_ids
from cli.connect import CliApiClient, client, cloud_command
from cli.errors import EXIT_USAGE, CliError, UnsavedWork, shown
from cli.repo import as_clone_url, current_repo, is_local_path, local_clone_problem, local_repo_refused, names_a_path
from cli.starting import LogFollower, wait_until_running
from runner.program import is_claude

session_id_arg = click.argument("session_id", metavar="ID", callback=lambda _c, _p, v: attaching.check_session_id(v),
                                shell_complete=complete_session_ids)


def _note(message: str) -> None:
    output.note(message)


def _split_names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


@click.command("new")
@click.argument("task", required=False)
@click.option("--repo", metavar="URL|PATH",
              help="Git URL or local repository directory to clone (default: this directory's origin).")
@click.option("--branch", metavar="B",
              help="Branch to check out (default: this directory's branch when --repo is not given).")
@click.option("-t", "--tier", type=click.Choice(["small", "medium", "large"]), default="small", show_default=True,
              help="small 2 CPU/4Gi, medium 4/8Gi, large 8/16Gi.")
@click.option("--program", metavar="CMD",
              help="The command run in the tmux session (default: the platform's agent, claude). "
              "It gets TASK in $ORZ_TASK and the file $ORZ_TASK_FILE; claude gets it as its prompt.")
@click.option("--secrets", "secret_names", metavar="NAME,...", help="Secrets to expose as environment variables.")
@click.option("--no-attach", is_flag=True, help="Create the session and return without attaching.")
@click.option("--wait/--no-wait", default=None,
              help="Wait until the session runs (default: wait unless --no-attach).")
@click.option("--timeout", metavar="S", type=click.IntRange(1), default=600, show_default=True,
              help="Seconds to wait for it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the API's Instance as JSON, alone on stdout, instead of attaching (for scripts).")
def new(task: str | None, repo: str | None, branch: str | None, tier: str, program: str | None,
        secret_names: str | None, no_attach: bool, wait: bool | None, timeout: int, as_json: bool) -> None:
    """Start a new session (and attach to it once it runs, from a terminal)."""
    local_repo = None
    if repo is not None and is_local_path(repo):
        local_repo = Path(repo).expanduser()
        repo = as_clone_url(str(local_repo), Path.cwd())
    elif repo is not None and names_a_path(repo):
        # Sent on, a mistyped path would come back as "repo_url must be an https://... URL".
        raise CliError(f"--repo {shown(repo, 96, quote=False)}: no such directory (a local repository by its "
                       "path, any other by its URL)", EXIT_USAGE)
    # A script, CI or a pipe (no terminal on stdin): ssh would get none ("Pseudo-terminal will not be
    # allocated") and read the script's own input as shell commands. It waits as usual and says how to attach.
    no_terminal = not no_attach and not as_json and not sys.stdin.isatty()
    attach_to = _new(task, repo, branch, tier, program, secret_names, no_attach or as_json or no_terminal,
                     (not no_attach) if wait is None else wait, timeout, local_repo, as_json, no_terminal)
    if attach_to:
        session_id, argv = attach_to
        attaching.run_attached(session_id, argv, lambda: _attach_again(session_id, False))


async def _note_limits(api: CliApiClient) -> None:
    """Say once, as a session is made, when it will stop and when a stopped one goes (the idle reaper's rules)."""
    try:
        limits = output.limits_line((await api.me()).org)
    except ApiError:
        return  # the session is made; this line is a courtesy
    if limits:
        _note(limits)


@cloud_command
async def _new(task: str | None, repo: str | None, branch: str | None, tier: str, program: str | None,
               secret_names: str | None, no_attach: bool, wait: bool, wait_s: int, local_repo: Path | None,
               as_json: bool = False, no_terminal: bool = False) -> tuple[str, list[str]] | None:
    # With --json, stdout holds the JSON alone: the lines a person reads go to stderr.
    say = _note if as_json else click.echo
    api = client()  # first, so "not logged in" comes before anything else
    if local_repo is not None and (problem := local_clone_problem(local_repo, branch)):
        await api.aclose()
        raise CliError(problem, EXIT_USAGE)
    if local_repo is not None:
        _note(f"the local repository is cloned from {repo}")
    local_config = from_local_repo(local_repo, branch) if local_repo is not None else None
    if repo is None:
        here = current_repo()
        if here.url:
            repo, branch = here.url, branch or here.branch
            if here.stripped_credentials:
                _note(f"this checkout's origin carries a user name or token; the session clones {repo} without "
                      "it (it would be stored with the session). A private repository needs a GIT_TOKEN secret: "
                      "orz cloud secrets create git --data GIT_TOKEN=... and --secrets git")
            local_config = from_checkout(Path.cwd(), here.branch, branch)
        elif here.branch:  # a repository of its own (git init), never pushed anywhere
            _note("this repository has no origin remote, so the session starts with an empty workspace; to "
                  "start it from this repository: orz cloud new --repo .")
        else:
            _note("no git origin in this directory: the session starts with an empty workspace")
    try:
        body = schemas.InstanceCreate(tier=tier, program=program, repo_url=repo, branch=branch,  # type: ignore[arg-type]
                                      secrets=_split_names(secret_names), task=task)
    except ValidationError as exc:
        await api.aclose()
        raise CliError(schemas.describe_validation(exc), EXIT_USAGE) from None
    async with api:
        if local_config is not None:
            await refuse_missing_secrets(api, local_config, body.secrets)
        try:
            inst = await api.create_instance(body)
        except ApiError as exc:
            if exc.body.get("code") == "repo_url_refused" and repo and repo.startswith("file://"):
                raise CliError(local_repo_refused(repo), EXIT_USAGE) from None
            raise
        where = f" from {inst.repo_url}" + (f" ({inst.branch})" if inst.branch else "") if inst.repo_url else ""
        say(f"session {inst.id} created{where}, {inst.tier} tier, {inst.status}")
        await _note_limits(api)
        if task and program and not is_claude(program):
            _note(f"the task reaches {program.split()[0]} as $ORZ_TASK and the file $ORZ_TASK_FILE, not as an "
                  "argument (to pass it: --program '... \"$ORZ_TASK\"')")
        if wait:
            try:
                with output.status_line(f"session {inst.id} is {inst.status}") as show:
                    inst = await wait_until_running(api, inst.id, _note, timeout_s=wait_s, show=show)
            except asyncio.CancelledError:  # Ctrl-C: the session keeps starting without us
                _note(f"stopped waiting; session {inst.id} is still there: orz cloud attach {inst.id} "
                      f"(or orz cloud kill {inst.id})")
                raise
            say(f"session {inst.id} is running")
        if no_attach:
            if no_terminal:
                _note("not attaching: standard input is not a terminal (--no-attach or --json says that is meant)")
            say(f"attach with: orz cloud attach {inst.id}   (or ssh {inst.id}{ssh_config.HOST_SUFFIX} "
                "after orz cloud ssh-config --write)")
            if as_json:
                # The attach token in the create answer's attach_url is a credential: not for a CI log.
                click.echo(output.to_json(inst.model_copy(
                    update={"attach_url": inst.attach_url and inst.attach_url.split("?", 1)[0]})))
            return None
        grant, cert = await attaching.fetch_certificate(api, inst.id)
        _note(f"attaching to {inst.id}; detach with Ctrl-b d, come back with: orz cloud attach {inst.id}")
        return inst.id, attaching.attach_command(grant, cert)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's InstanceList as JSON (see docs/cli.md).")
@cloud_command
async def list_cmd(as_json: bool) -> None:
    """Your sessions (an org admin: every session of the org) and the org's quota."""
    async with client() as api:
        listing = await api.list_instances()
    if as_json:
        click.echo(output.to_json(listing))
        return
    if listing.instances:
        output.print_table(output.instances_table(listing.instances))
    else:
        click.echo("no sessions; start one with: orz cloud new")
    click.echo(output.quota_line(listing.quota))


@click.command("attach")
@click.argument("session_id", metavar="ID|ATTACH_URL",
                callback=lambda _c, _p, v: attaching.session_from_id_or_url(v), shell_complete=complete_session_ids)
@click.option("--readonly", is_flag=True, help="Watch without typing (a read-only tmux client).")
def attach(session_id: str, readonly: bool) -> None:
    """Attach to a session's tmux over SSH (a fresh certificate, then the system ssh).

    ATTACH_URL: a session's attach_url (as the Go CLI took it); the session id in it is what counts."""
    attaching.run_attached(session_id, _attach(session_id, readonly), lambda: _attach_again(session_id, readonly))


@cloud_command
async def _attach(session_id: str, readonly: bool) -> list[str]:
    async with client() as api:
        grant, cert = await attaching.fetch_certificate(api, session_id, readonly=readonly)
    mode = " read-only" if readonly else ""
    _note(f"attaching{mode} to {session_id} ({grant.status}); detach with Ctrl-b d")
    return attaching.attach_command(grant, cert)


@cloud_command
async def _attach_again(session_id: str, readonly: bool) -> list[str]:
    """After a gateway restart: a fresh certificate (the API also says no if the session is gone)."""
    async with client() as api:
        grant, cert = await attaching.fetch_certificate(api, session_id, readonly=readonly)
    return attaching.attach_command(grant, cert)


@click.command("kill")
@session_id_arg
@click.option("--force", is_flag=True,
              help="Kill even with unsaved work (a running session still pushes it to orz/<id> where it can).")
@cloud_command
async def kill(session_id: str, force: bool) -> None:
    """Delete a session: its compute and its workspace.

    Refused (exit 6) while the workspace holds uncommitted files or unpushed commits that are not saved
    to the session's WIP branch, or when the session's runner could not say (a running session is stopped
    first to read its final state); --force kills anyway."""
    async with client() as api:
        try:
            inst = await api.delete_instance(session_id, force=force)
        except ApiError as exc:
            code = exc.body.get("code") if exc.status == 409 else None
            if code == "work_unknown":
                raise UnsavedWork(exc.detail.replace("delete anyway with ?force=true", "kill with --force")) from None
            if code != "unsaved_work":
                raise
            work = schemas.WorkState.model_validate(exc.body.get("work") or {})
            if exc.body.get("current_state") == "stopped":
                then = (f"it is stopped with its workspace kept: `orz cloud start {session_id}` and push the work, "
                        f"or kill with --force")
            else:
                then = (f"push it, or kill with --force (a running session pushes it to orz/{session_id} first "
                        f"where it can)")
            raise UnsavedWork(f"session {session_id} has unsaved work: {work.summary()}; {then}") from None
    keys.forget_session(session_id)
    ssh_config.forget_host(session_id)
    click.echo(f"session {inst.id} killed ({inst.status})")


# Run by the session's shell in the workspace: what is uncommitted (untracked files by name), then the diff
# against HEAD, then the commits no remote branch has. A session made without a repository has no git
# workspace, and a new repository no HEAD yet: each gets a line of its own instead of git's errors.
NOT_A_REPO = "orz: the session's workspace is not a git repository (the session was made without --repo)"
# Nothing at all to show says so (on stderr), rather than print nothing; unpushed commits get a heading.
NO_CHANGES = "no changes: nothing uncommitted, and every commit is on a remote branch"
DIFF_COMMAND = ("if ! git rev-parse --git-dir >/dev/null 2>&1; then echo \"" + NOT_A_REPO + "\" >&2; exit 1; fi; "
                "git --no-pager status --short && if git rev-parse -q --verify HEAD >/dev/null; then "
                "git --no-pager diff HEAD{color} && c=$(git --no-pager log --oneline HEAD --not --remotes --) && "
                "if [ -n \"$c\" ]; then echo 'commits on no remote branch:'; echo \"$c\"; fi; fi && "
                "if [ -z \"$(git status --porcelain)$c\" ]; then echo '" + NO_CHANGES + "' >&2; fi")


@click.command("diff")
@session_id_arg
@click.option("--color/--no-color", default=None, help="Colour the diff (default: when stdout is a terminal).")
def diff(session_id: str, color: bool | None) -> None:
    """The workspace's changes: uncommitted files, their diff against HEAD, and unpushed commits.

    Runs git in the session over SSH (a fresh certificate, then the system ssh); the session must run."""
    colored = sys.stdout.isatty() if color is None else color
    attaching.exec_ssh(_diff(session_id, colored))


@cloud_command
async def _diff(session_id: str, colored: bool) -> list[str]:
    async with client() as api:
        # A read-only certificate gets only the interactive terminal, no command.
        grant, cert = await attaching.fetch_certificate(api, session_id)
    argv = attaching.attach_command(grant, cert)
    argv[argv.index("-t")] = "-T"  # a command, no terminal
    return [*argv, DIFF_COMMAND.format(color=" --color=always" if colored else "")]


@click.command("stop")
@session_id_arg
@cloud_command
async def stop(session_id: str) -> None:
    """Stop a session: compute released, workspace kept."""
    async with client() as api:
        inst = await api.stop_instance(session_id)
    click.echo(f"session {inst.id} {inst.status}; start it again with: orz cloud start {inst.id}")


@click.command("start")
@session_id_arg
@click.option("--pull", is_flag=True,
              help="First move the workspace to the branch's current head (uncommitted changes are stashed); "
              "a session whose setup never finished gets this without --pull.")
@cloud_command
async def start(session_id: str, pull: bool) -> None:
    """Start a stopped (or failed) session on its kept workspace."""
    async with client() as api:
        inst = await api.start_instance(session_id, pull=pull)
    click.echo(f"session {inst.id} {inst.status}")
    if pull:
        click.echo(f"what the update did is in its log: orz cloud logs {inst.id}")


@click.command("logs")
@session_id_arg
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the session is killed (or Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's InstanceLogs (init log and events) as JSON.")
@cloud_command
async def logs(session_id: str, follow: bool, as_json: bool) -> None:
    """The session's init log (setup.init output, workspace updates); on orz server also the runner's
    warnings and errors of its current run."""
    if as_json and follow:
        raise CliError("--json prints the log once; it does not go with --follow", EXIT_USAGE)
    follower = LogFollower(click.echo)
    async with client() as api:
        if as_json:
            click.echo(output.to_json(await api.logs(session_id)))
            return
        follower.update((await api.logs(session_id)).init_log)
        if not follow:
            if not follower.shown:  # a silent exit 0 reads as a broken command
                click.echo(f"(no init log: {session_id} has run no setup.init, or it printed nothing)", err=True)
            return
        while True:
            try:
                inst = await api.get_instance(session_id)
                if inst.status in ("deleting", "deleted"):
                    return
                await asyncio.sleep(1.0)
                follower.update((await api.logs(session_id)).init_log)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # Killed between two polls (deleting lasts a moment): the end -f waits for, not an error.
                click.echo(f"(session {session_id} was killed)", err=True)
                return


@click.command("status")
@session_id_arg
@click.option("--json", "as_json", is_flag=True, help="Print the API's InstanceStatus as JSON.")
@cloud_command
async def status(session_id: str, as_json: bool) -> None:
    """A session's details and its latest events."""
    async with client() as api:
        st = await api.instance_status(session_id)
    if as_json:
        click.echo(output.to_json(st))
        return
    for name, value in output.describe(st.instance):
        click.echo(f"{name + ':':<13}{value}")
    if st.program_exit is not None:
        click.echo(f"{'exited:':<13}{output.program_exit_line(st.program_exit, st.instance.id)}")
    if st.instance.status == "failed":  # what the reason leaves open: what to do about it
        sid = st.instance.id
        click.echo(f"{'next:':<13}fix what the reason names (details: orz cloud logs {sid}), then orz cloud start "
                   f"{sid} tries again on the same workspace; or orz cloud kill {sid}")
    if st.events:
        click.echo("events:")
        for event in st.events[-10:]:
            click.echo(f"  {output.event_line(event)}")


COMMANDS = [new, list_cmd, attach, kill, diff, stop, start, logs, status]
