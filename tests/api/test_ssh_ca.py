"""The SSH user CA: key persistence and certificate contents."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import asyncssh
import pytest

from api.credentials import ssh_ca
from api.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


def _user_pub() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()


def _fields(cert_line: str) -> tuple[str, list[bytes]]:
    """Key id and extension names (in order) from the certificate blob; asyncssh hides both."""
    from asyncssh.packet import SSHPacket

    cert = asyncssh.import_certificate(cert_line)
    packet = SSHPacket(cert.public_data)
    packet.get_string()  # algorithm
    packet.get_string()  # nonce
    packet.get_string()  # ed25519 public key
    packet.get_uint64()
    packet.get_uint32()
    key_id = packet.get_string().decode()
    packet.get_string()
    packet.get_uint64()
    packet.get_uint64()
    packet.get_string()  # critical options
    ext = SSHPacket(packet.get_string())
    names = []
    while ext:
        names.append(ext.get_string())
        ext.get_string()
    return key_id, names


def _extensions(cert_line: str) -> list[bytes]:
    return _fields(cert_line)[1]


def test_ca_key_created_once_with_private_mode(settings: Settings) -> None:
    key = ssh_ca.load_or_create_ca(settings)
    path = settings.keys_dir / "ssh_ca"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (settings.keys_dir / "ssh_ca.pub").read_text().startswith("ssh-ed25519 ")
    again = ssh_ca.load_or_create_ca(settings)
    assert again.public_data == key.public_data


def test_certificate_fields(settings: Settings) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    now = time.time()
    signed = ssh_ca.sign_user_certificate(ca, _user_pub(), session_id="demo-1", user_id="usr_1",
                                          ttl_s=300, now=now)
    cert = asyncssh.import_certificate(signed.text)
    assert cert.principals == ["demo-1"]
    assert _fields(signed.text)[0] == "user:usr_1" == signed.key_id
    assert cert.signing_key.public_data == ca.public_data
    assert signed.valid_after == int(now) - 30 and signed.valid_before == int(now) + 300
    assert cert.options.get("permit-pty") and cert.options.get("permit-port-forwarding")
    assert cert.options.get("permit-agent-forwarding")
    assert "permit-X11-forwarding" not in cert.options and "permit-user-rc" not in cert.options
    assert b"readonly@orz.cloud" not in _extensions(signed.text)
    cert.validate(asyncssh.public_key.CERT_TYPE_USER, "demo-1")
    with pytest.raises(ValueError, match="principal"):
        cert.validate(asyncssh.public_key.CERT_TYPE_USER, "other")


def test_readonly_and_no_forwarding(settings: Settings) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    signed = ssh_ca.sign_user_certificate(ca, _user_pub(), session_id="s", user_id="u", ttl_s=60,
                                          readonly=True, permit_port_forwarding=False)
    names = _extensions(signed.text)
    assert names == sorted(names)  # OpenSSH wants extensions in lexical order
    assert b"readonly@orz.cloud" in names and b"permit-port-forwarding" not in names


def test_openssh_accepts_the_certificate(settings: Settings, tmp_path: Path) -> None:
    import shutil
    import subprocess

    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen not installed")
    ca = ssh_ca.load_or_create_ca(settings)
    signed = ssh_ca.sign_user_certificate(ca, _user_pub(), session_id="s1", user_id="u1", ttl_s=60,
                                          readonly=True)
    path = tmp_path / "id-cert.pub"
    path.write_text(signed.text + "\n")
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True)
    assert 'Key ID: "user:u1"' in out.stdout
    assert "readonly@orz.cloud" in out.stdout and "permit-pty" in out.stdout


@pytest.mark.parametrize("bad", [
    "", "not a key", "ssh-ed25519 AAAAnotbase64", "ssh-dss AAAAB3NzaC1kc3MAAACBAP==",
    "-----BEGIN OPENSSH PRIVATE KEY-----", "ssh-ed25519 AAAA\nssh-ed25519 BBBB",
])
def test_bad_public_keys_rejected(settings: Settings, bad: str) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    with pytest.raises(ssh_ca.CertificateError):
        ssh_ca.sign_user_certificate(ca, bad, session_id="s", user_id="u", ttl_s=60)


def test_certificate_cannot_be_certified(settings: Settings) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    cert = ssh_ca.sign_user_certificate(ca, _user_pub(), session_id="s", user_id="u", ttl_s=60)
    with pytest.raises(ssh_ca.CertificateError):
        ssh_ca.sign_user_certificate(ca, cert.text, session_id="s", user_id="u", ttl_s=60)


def test_short_rsa_key_rejected(settings: Settings) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=1024).export_public_key().decode()
    with pytest.raises(ssh_ca.CertificateError, match="2048"):
        ssh_ca.sign_user_certificate(ca, weak, session_id="s", user_id="u", ttl_s=60)


@pytest.mark.parametrize("bad, line", [
    ("", "public_key must be one OpenSSH public key line"),
    ("  \n ", "public_key must be one OpenSSH public key line"),
    ("ssh-ed25519 AAAA\nssh-ed25519 BBBB", "public_key must be one OpenSSH public key line"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "that is a private key: send the .pub file's contents"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP==", "unsupported public key type 'ssh-dss'"),
    ("x" * 60 + " AAAA", f"unsupported public key type {'x' * 40!r}"),
    ("ssh-ed25519 AAAAnotbase64", "public_key is not a valid OpenSSH public key"),
])
def test_bad_public_keys_are_refused_with_a_line_that_says_why(settings: Settings, bad: str, line: str) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    with pytest.raises(ssh_ca.CertificateError) as err:
        ssh_ca.sign_user_certificate(ca, bad, session_id="s", user_id="u", ttl_s=60)
    assert str(err.value) == line


def test_rsa_keys_of_2048_bits_and_keys_with_comments_are_certified(settings: Settings) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key().decode().strip()
    signed = ssh_ca.sign_user_certificate(ca, rsa + " me@laptop", session_id="s", user_id="u", ttl_s=60)
    assert signed.text.startswith("ssh-rsa-cert-v01@openssh.com ")


def test_certificate_times_come_from_now_and_comments_name_ca_and_session(settings: Settings) -> None:
    ca = ssh_ca.load_or_create_ca(settings)
    signed = ssh_ca.sign_user_certificate(ca, _user_pub(), session_id="demo-1", user_id="u", ttl_s=60,
                                          now=1_000_000.5)
    assert (signed.valid_after, signed.valid_before) == (1_000_000 - 30, 1_000_000 + 60)
    assert signed.text.endswith(" orz demo-1")
    pub = (settings.keys_dir / "ssh_ca.pub").read_text().strip()
    assert pub.endswith(" orz-user-ca") and ca.export_public_key("openssh").decode().strip() == pub
