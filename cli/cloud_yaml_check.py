"""`orz cloud new` checks the repository's .orz/cloud.yaml for ${SECRET}s no named secret provides, before
a session is made that would fail at start. Only where the file can be read here: a local checkout."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import click

from api.client import ApiClient
from api.schemas import CLOUD_CONFIG_PATH as CONFIG_PATH
from cli.errors import EXIT_USAGE, CliError
from cli.repo import file_at, git_toplevel, has_ref

RUNNER_VALIDATOR = "runner.cloud_config"


def load_validator() -> ModuleType | None:
    """The runner's validator, or None where this installation has no runner package."""
    try:
        return importlib.import_module(RUNNER_VALIDATOR)
    except ModuleNotFoundError as exc:
        if exc.name in ("runner", RUNNER_VALIDATOR):
            return None
        raise


@dataclass(frozen=True)
class LocalConfig:
    """A .orz/cloud.yaml read here, standing in for the one the session will clone."""

    text: str
    source: str  # what was read, for the message
    caveat: str  # how it may differ from what the session clones ("" when it is that very file)


def from_local_repo(path: Path, branch: str | None) -> LocalConfig | None:
    """`--repo PATH`: the session clones this repository's committed branch, which can be read as it is now."""
    ref = branch or "HEAD"
    text = file_at(path, ref, CONFIG_PATH)
    if text is None:
        return None
    return LocalConfig(text, f"{CONFIG_PATH} as committed on {ref} in {path}",
                       "commits made there before the session clones it would change it")


def from_checkout(cwd: Path, checked_out: str | None, branch: str | None) -> LocalConfig | None:
    """No --repo: the session clones origin's ``branch``; this checkout knows origin/<branch> as last fetched,
    else (never fetched) its own file when it is on that branch."""
    if not branch:
        return None
    top = git_toplevel(cwd)
    if top is None:
        return None
    remote_ref = f"refs/remotes/origin/{branch}"
    if has_ref(top, remote_ref):
        text = file_at(top, remote_ref, CONFIG_PATH)
        if text is None:
            return None
        local = top / CONFIG_PATH
        edited = local.exists() and local.read_text(encoding="utf-8", errors="replace") != text
        return LocalConfig(text, f"{CONFIG_PATH} of origin/{branch} as this checkout last fetched it",
                           "origin may have changed since (git fetch)"
                           + ("; this checkout's own copy differs and is not what the session gets" if edited else ""))
    if checked_out != branch:
        return None
    local = top / CONFIG_PATH
    try:
        text = local.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return LocalConfig(text, f"this checkout's {CONFIG_PATH} ({local})",
                       f"the session clones {branch} from origin, whose copy may differ from this one")


async def refuse_missing_secrets(api: ApiClient, local: LocalConfig, secret_names: list[str]) -> None:
    """Raise CliError when the file uses a ${KEY} that none of ``secret_names`` has; a file that does not
    load is left for the session to report (it may not be the file the session gets)."""
    validator = load_validator()
    if validator is None:
        return
    try:
        config = validator.load(local.text, CONFIG_PATH)
    except validator.CloudConfigError:
        return
    if not validator.secret_refs(config):
        return
    keys = await secret_keys(api, secret_names) if secret_names else frozenset()
    problems = validator.missing_secrets(config, keys)
    if not problems:
        return
    for problem in problems:
        click.echo(f"orz: {problem}", err=True)
    caveat = f"; {local.caveat}" if local.caveat else ""
    raise CliError(f"no session created: it would fail at start (checked {local.source}{caveat}); "
                   "name the secrets with --secrets NAME,... (orz cloud validate --secrets NAME,... checks them)",
                   EXIT_USAGE)


async def secret_keys(api: ApiClient, names: list[str]) -> frozenset[str]:
    """The keys of the named secrets as a session would see them; unknown names add none (the API says
    which are unknown when asked to create the session)."""
    listing = await api.list_secrets()
    by_name = {s.name: s for s in listing.secrets}
    return frozenset(key for n in names if n in by_name for key in by_name[n].keys)
