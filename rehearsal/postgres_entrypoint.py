"""What the official postgres image's entrypoint does, with this machine's PostgreSQL binaries.

On an empty PGDATA: initdb with POSTGRES_USER and POSTGRES_PASSWORD (password auth for TCP), create
POSTGRES_DB; then run the server listening on every address of the Pod.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    data = Path(os.environ.get("PGDATA", "/var/lib/postgresql/data"))
    user = os.environ.get("POSTGRES_USER", "postgres")
    password = os.environ.get("POSTGRES_PASSWORD", "")
    database = os.environ.get("POSTGRES_DB", user)
    if not password:
        sys.exit("postgres: POSTGRES_PASSWORD is required, as by the official image")
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile("w", delete=False) as pwfile:
            pwfile.write(password)
        try:
            subprocess.run(["initdb", "-D", str(data), "--username", user, "--pwfile", pwfile.name,
                            "--auth-local", "trust", "--auth-host", "scram-sha-256"], check=True,
                           stdout=sys.stdout, stderr=sys.stderr)
        finally:
            os.unlink(pwfile.name)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all all scram-sha-256\n")
        if database != "postgres":
            subprocess.run(["postgres", "--single", "-D", str(data), "postgres"], text=True, check=True,
                           input=f'CREATE DATABASE "{database}"\n', stdout=subprocess.DEVNULL)
        print(f"postgres: initialised {data} with database {database}", flush=True)
    argv = sys.argv[1:] or ["postgres"]
    if argv[0] == "postgres":
        argv = [*argv, "-D", str(data), "-c", "listen_addresses=*", "-c", "unix_socket_directories=/var/run/postgresql"]
    os.execvp(argv[0], argv)  # noqa: S606  # nosec B606  # the image's command, an argv list


if __name__ == "__main__":
    main()
