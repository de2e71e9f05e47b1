"""Seal and open secret values with AES-256-GCM under a rotating key-encryption key.

Every ciphertext carries the id of the key that made it, a random 12-byte nonce, and associated data
binding it to its row (org, scope, name, key id): a ciphertext copied onto another row, or a key id
edited in the database, fails authentication instead of decrypting into the wrong place.
Failures are typed (api.errors.SecretUnreadable) and name the secret and key id, never a value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from api.credentials.secrets_keys import (
    DEFAULT_KEY_FILE,
    KeyRing,
    check_settings,
    load_or_create_key_file,
    parse_keyring,
    read_key_file,
)
from api.errors import SecretUnreadable
from api.settings import Settings

NONCE_BYTES = 12
AAD_VERSION = "orz.secret.v1"


@dataclass(frozen=True)
class RowBinding:
    """What a ciphertext is bound to: the row's identity in its org."""

    org_id: str
    scope: str
    name: str

    def associated_data(self, key_id: str) -> bytes:
        # A JSON array is unambiguous whatever the fields contain (no separator can be forged).
        return json.dumps([AAD_VERSION, self.org_id, self.scope, self.name, key_id]).encode()


@dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


class SecretsBox:
    """Encrypts and decrypts secret values; keys come from a KeyRing, loaded lazily when from a file."""

    def __init__(self, ring: KeyRing | None = None, *, loader: Callable[[], KeyRing] | None = None) -> None:
        if ring is None and loader is None:
            raise ValueError("SecretsBox needs a key ring or a loader")
        self._ring = ring
        self._loader = loader

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretsBox:
        """Keys from ORZ_SECRETS_KEY, else ORZ_SECRETS_KEY_FILE, else {data_dir}/keys/secrets.key."""
        check_settings(settings)
        inline = settings.secrets_key.get_secret_value()
        if inline.strip():
            return cls(parse_keyring(inline, "ORZ_SECRETS_KEY"))
        if settings.secrets_key_file:
            path = settings.secrets_key_file
            # An explicitly configured file must exist now: fail at start-up, not at the first secret.
            return cls(read_key_file(path), loader=lambda: read_key_file(path))
        default = settings.keys_dir / DEFAULT_KEY_FILE
        # The embedded default generates its key on first use, so merely starting writes nothing.
        return cls(loader=lambda: load_or_create_key_file(default))

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            assert self._loader is not None
            self._ring = self._loader()
        return self._ring

    @property
    def current_key_id(self) -> str:
        return self.ring.current_id

    def reload(self) -> None:
        """Read file-held keys again (a rotation elsewhere put a new key in front)."""
        if self._loader is not None:
            self._ring = self._loader()

    def seal(self, plaintext: bytes, binding: RowBinding) -> Sealed:
        ring = self.ring
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(ring.current_key).encrypt(nonce, plaintext, binding.associated_data(ring.current_id))
        return Sealed(ring.current_id, nonce, ciphertext)

    def open(self, sealed: Sealed, binding: RowBinding) -> bytes:
        key = self.ring.key(sealed.key_id)
        if key is None and self._loader is not None:
            # Another process may have rotated the key file since we read it.
            self.reload()
            key = self.ring.key(sealed.key_id)
        if key is None:
            raise SecretUnreadable(
                f"secret {binding.name!r} is encrypted with key id {sealed.key_id!r}, which is not configured",
                internal=f"configured secrets key ids: {', '.join(self.ring.ids)}; add key {sealed.key_id!r} back",
                secret=binding.name, key_id=sealed.key_id,
            )
        if len(sealed.nonce) != NONCE_BYTES:
            raise SecretUnreadable(
                f"secret {binding.name!r} (key id {sealed.key_id!r}) has a malformed nonce; the row was altered",
                secret=binding.name, key_id=sealed.key_id,
            )
        try:
            return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, binding.associated_data(sealed.key_id))
        except InvalidTag:
            raise SecretUnreadable(
                f"secret {binding.name!r} failed authentication under key id {sealed.key_id!r}: the key with that "
                "id is not the one it was sealed with, or the stored row was altered",
                secret=binding.name, key_id=sealed.key_id,
            ) from None

    def seal_values(self, values: Mapping[str, str], binding: RowBinding) -> Sealed:
        return self.seal(json.dumps(dict(values), separators=(",", ":")).encode(), binding)

    def open_values(self, sealed: Sealed, binding: RowBinding) -> dict[str, str]:
        data = json.loads(self.open(sealed, binding))
        if not isinstance(data, dict):
            raise SecretUnreadable(f"secret {binding.name!r} decrypted to an unexpected shape",
                                   secret=binding.name, key_id=sealed.key_id)
        return {str(k): str(v) for k, v in data.items()}
