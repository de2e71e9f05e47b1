"""The sweep a full-stack fixture makes after it had to kill `orz server`: the processes its sessions left
(each in a session of its own, as the sandbox launcher starts them) go, and nothing else does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import kill_processes_under


def test_the_sweep_kills_what_names_the_dir_and_spares_the_rest(tmp_path: Path) -> None:
    base = tmp_path / "platform"
    (base / "data" / "sessions" / "s1").mkdir(parents=True)
    socket = base / "data" / "sessions" / "s1" / "tmux.sock"  # a path on the command line, as tmux -S has it
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(socket)],
                            start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        killed = kill_processes_under(base)
        assert left.pid in killed
        assert left.wait(5) == -9
        assert bystander.poll() is None
    finally:
        for proc in (left, bystander):
            proc.kill()
            proc.wait()
