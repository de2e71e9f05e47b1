"""runner/paths.py: the one view of paths exec, sftp and scp share (the clients' view is in
test_automation_clients.py)."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import MagicMock

import asyncssh
import pytest

from runner.paths import SessionSFTP, expand_login_home


@pytest.mark.parametrize(("command", "expanded"), [
    ("echo ~s1", "echo /home/s1"),
    ("/bin/sh -c 'echo ~s1 && sleep 0'", "/bin/sh -c 'echo /home/s1 && sleep 0'"),  # Ansible's question
    ('mkdir -p "` echo ~s1/.ansible/tmp `"', 'mkdir -p "` echo /home/s1/.ansible/tmp `"'),
    ("X=~s1/a:~s1/b", "X=/home/s1/a:/home/s1/b"),
    ("echo ~s10 a~s1 ~s1x ~ ~/x", "echo ~s10 a~s1 ~s1x ~ ~/x"),  # other words stay; bash expands ~ itself
])
def test_the_login_names_home_in_commands(command: str, expanded: str) -> None:
    assert expand_login_home(command, "s1", "/home/s1") == expanded


def test_a_home_a_shell_would_misread_is_left_alone() -> None:
    assert expand_login_home("echo ~s1", "s1", "/home/a b") == "echo ~s1"
    assert expand_login_home("echo ~s1", "", "/home/s1") == "echo ~s1"


def server(tmp_path: Path) -> SessionSFTP:
    (tmp_path / "ws").mkdir()
    (tmp_path / "home").mkdir()
    return SessionSFTP(MagicMock(spec=asyncssh.SSHServerChannel), cwd=tmp_path / "ws", home=tmp_path / "home",
                       login="s1")


def test_sftp_paths(tmp_path: Path) -> None:
    sftp = server(tmp_path)
    ws, home = str(tmp_path / "ws").encode(), str(tmp_path / "home").encode()
    assert sftp.map_path(b".") == ws
    assert sftp.map_path(b"a/b") == ws + b"/a/b"
    assert sftp.map_path(ws + b"/x") == ws + b"/x"
    assert sftp.map_path(b"~") == home and sftp.map_path(b"~/x") == home + b"/x"
    assert sftp.map_path(b"~s1/.ansible") == home + b"/.ansible"
    assert sftp.map_path(b"/" + ws + b"/x") == ws + b"/x"  # "//" is "/"
    assert sftp.map_path(b"~root") == ws + b"/~root"  # another user's ~ is a name, as sshd's sftp takes it
    for outside in (b"/etc/passwd", b"..", b"../ws-other", ws + b"/../../..", b"~s1/.."):
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            sftp.map_path(outside)


def test_a_symlink_target_is_kept_as_written(tmp_path: Path) -> None:
    sftp = server(tmp_path)
    sftp.symlink(b"/usr/bin/python3", b"py")
    assert (tmp_path / "ws" / "py").readlink() == Path("/usr/bin/python3")
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        sftp.symlink(b"x", b"/etc/orz-link")
