"""Key-encryption keys for stored secrets: parsed from settings, or generated for the embedded default.

Format (``ORZ_SECRETS_KEY`` or the contents of ``ORZ_SECRETS_KEY_FILE``): one or more entries separated
by commas or newlines, each ``kid:base64`` or a bare ``base64`` of exactly 32 bytes. The first entry is
the current key (new and rotated rows are sealed with it); the others only decrypt older rows. A bare
key's id is derived from a hash of the key, so the same key always gets the same id.

Rotation: put a new key first (``new:...,old:...``), roll it out to every replica, run
``orz admin rotate-secrets-key``, then drop the old entry once no row uses it.
Error messages name key ids and entry positions, never key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from api.errors import SecretsKeyError
from api.settings import Settings

log = logging.getLogger(__name__)

KEY_BYTES = 32
# Fits the secrets.key_id column (String(32)) and is safe to print.
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
DEFAULT_KEY_FILE = "secrets.key"


@dataclass(frozen=True)
class KeyRing:
    """Keys by id, in configuration order; the first is the one new ciphertext is made with."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def current_id(self) -> str:
        return self.keys[0][0]

    @property
    def current_key(self) -> bytes:
        return self.keys[0][1]

    def key(self, key_id: str) -> bytes | None:
        for kid, key in self.keys:
            if kid == key_id:
                return key
        return None

    @property
    def ids(self) -> list[str]:
        return [kid for kid, _ in self.keys]

    def __repr__(self) -> str:  # never the key bytes
        return f"KeyRing(ids={self.ids})"


def fingerprint_id(key: bytes) -> str:
    """A stable id for a key given without one (a one-way hash: reveals nothing usable)."""
    return "k" + hashlib.sha256(b"orz-secrets-kid\0" + key).hexdigest()[:12]


def _decode_key(text: str, where: str) -> bytes:
    # Accept the URL-safe alphabet too: people paste keys from either kind of generator.
    normalized = text.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(normalized, validate=True)
    except (binascii.Error, ValueError):
        raise SecretsKeyError(f"{where}: the key is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise SecretsKeyError(f"{where}: the key must decode to {KEY_BYTES} bytes, not {len(key)}")
    return key


def parse_keyring(text: str, source: str) -> KeyRing:
    """Parse key entries; ``source`` names where they came from in error messages."""
    entries = [e.strip() for e in re.split(r"[,\n]", text) if e.strip() and not e.strip().startswith("#")]
    if not entries:
        raise SecretsKeyError(f"{source} holds no key")
    keys: list[tuple[str, bytes]] = []
    for position, entry in enumerate(entries, start=1):
        kid, sep, encoded = entry.partition(":")
        if sep:
            kid = kid.strip()
            where = f"{source}, key id {kid!r}"
            if not KEY_ID_RE.match(kid):
                raise SecretsKeyError(f"{source}, entry {position}: key ids are 1-32 characters of A-Z a-z 0-9 _ . -")
            key = _decode_key(encoded, where)
        else:
            key = _decode_key(entry, f"{source}, entry {position}")
            kid = fingerprint_id(key)
        if any(kid == seen for seen, _ in keys):
            raise SecretsKeyError(f"{source}: key id {kid!r} appears twice")
        keys.append((kid, key))
    return KeyRing(tuple(keys))


def new_key_entry() -> str:
    """A fresh random key as one ``kid:base64`` entry."""
    key = secrets.token_bytes(KEY_BYTES)
    return f"{fingerprint_id(key)}:{base64.b64encode(key).decode()}"


def read_key_file(path: Path) -> KeyRing:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SecretsKeyError(f"secrets key file {path} does not exist") from None
    except OSError as exc:
        raise SecretsKeyError(f"secrets key file {path} cannot be read: {exc.strerror}") from None
    if path.stat().st_mode & 0o077:
        log.warning("secrets key file %s is readable by other users; chmod 600 it", path)
    return parse_keyring(text, f"secrets key file {path}")


def _write_new_file(path: Path, text: str) -> None:
    """Create ``path`` (mode 0600) with ``text``, atomically; FileExistsError if someone else won."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if the target exists, so two processes starting at once agree on one key.
        os.link(tmp, path)
    finally:
        tmp.unlink()


def load_or_create_key_file(path: Path) -> KeyRing:
    """The embedded default: read the key file, generating it with one new key on first use."""
    if not path.exists():
        entry = new_key_entry()
        try:
            _write_new_file(path, entry + "\n")
            log.warning(
                "generated a new secrets key (id %s) in %s; back it up: stored secrets cannot be "
                "decrypted without it", entry.partition(":")[0], path,
            )
        except FileExistsError:
            pass
    return read_key_file(path)


def prepend_new_key(path: Path) -> str:
    """Rotation for file-held keys: write a new current key in front of the existing ones; returns its id."""
    ring = read_key_file(path)
    entry = new_key_entry()
    old = "\n".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in ring.keys)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{entry}\n{old}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return entry.partition(":")[0]


def key_file_path(settings: Settings) -> Path | None:
    """Where keys live when they come from a file (configured or the embedded default); None for env keys."""
    if settings.secrets_key.get_secret_value().strip():
        return None
    return settings.secrets_key_file or settings.keys_dir / DEFAULT_KEY_FILE


def check_settings(settings: Settings) -> None:
    if settings.secrets_key.get_secret_value().strip() and settings.secrets_key_file:
        raise SecretsKeyError("set ORZ_SECRETS_KEY or ORZ_SECRETS_KEY_FILE, not both")
