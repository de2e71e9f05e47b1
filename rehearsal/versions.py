"""A "next release" of this checkout for the upgrade and rollback steps: the same code plus one
expand-only migration, so old and new code meet one schema as they do in a rolling upgrade and after
`helm rollback`. It is run through an image tag of its own (rehearsal.images.CODE_BY_TAG)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory

ROOT = Path(__file__).resolve().parents[1]
NEXT_TAG = "rehearsal-next"
NEXT_REVISION = "rehearsal_next"
PACKAGES = ("api", "cli", "gateway", "runner", "migrations")

MIGRATION = '''"""rehearsal's next release: a nullable column old code never reads (expand only)

Revision ID: {revision}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None
expand_only = True


def upgrade() -> None:
    op.add_column("events", sa.Column("rehearsal_note", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("events", "rehearsal_note")
'''


def current_head() -> str:
    scripts = ScriptDirectory(str(ROOT / "migrations"))
    head = scripts.get_current_head()
    assert head is not None
    return head


def _add_migration(dest: Path) -> None:
    (dest / "migrations" / "versions" / f"9999_{NEXT_REVISION}.py").write_text(
        MIGRATION.format(revision=NEXT_REVISION, down=current_head()))


def make_next_release(dest: Path) -> Path:
    """Copy this checkout's packages to `dest` and add one expand-only migration on top of the head."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    _add_migration(dest)
    dest.chmod(0o755)
    return dest


def write_build_context(dest: Path) -> Path:
    """The next release as a `docker build` context: every tracked file plus the migration (kind's images)."""
    shutil.rmtree(dest, ignore_errors=True)
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    _add_migration(dest)
    return dest


if __name__ == "__main__":
    # hack/e2e-kind.sh: python -m rehearsal.versions DIR -> a build context for the rehearsal-next image.
    print(write_build_context(Path(sys.argv[1]).resolve()))
