"""The secrets box and its keys: AES-256-GCM, key ids, associated data, fail-closed errors."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from api.credentials.secrets_box import RowBinding, Sealed, SecretsBox
from api.credentials.secrets_keys import (
    KeyRing,
    fingerprint_id,
    load_or_create_key_file,
    parse_keyring,
    prepend_new_key,
    read_key_file,
)
from api.errors import SecretsKeyError, SecretUnreadable
from api.settings import Settings

VALUE = "sk-test-never-shown-4f1c2a"
ROW = RowBinding(org_id="org_1", scope="usr_1", name="anthropic")


def b64key(seed: int) -> str:
    return base64.b64encode(bytes([seed]) * 32).decode()


def box_with(*entries: str) -> SecretsBox:
    return SecretsBox(parse_keyring(",".join(entries), "test"))


def test_round_trip_and_fresh_nonce() -> None:
    box = box_with(f"k1:{b64key(1)}")
    first = box.seal_values({"KEY": VALUE}, ROW)
    second = box.seal_values({"KEY": VALUE}, ROW)
    assert first.key_id == "k1"
    assert len(first.nonce) == 12
    assert first.nonce != second.nonce and first.ciphertext != second.ciphertext
    assert VALUE.encode() not in first.ciphertext
    assert box.open_values(first, ROW) == {"KEY": VALUE}


def test_unknown_key_id_fails_closed_naming_it() -> None:
    sealed = box_with(f"old:{b64key(1)}").seal_values({"KEY": VALUE}, ROW)
    with pytest.raises(SecretUnreadable) as caught:
        box_with(f"new:{b64key(2)}").open_values(sealed, ROW)
    err = caught.value
    assert "'old'" in err.detail and "anthropic" in err.detail
    assert err.status == 500 and err.code == "secret_unreadable"
    assert VALUE not in str(err) and b64key(1) not in str(err) and b64key(1) not in (err.internal or "")


def test_same_key_id_with_another_key_fails_authentication() -> None:
    sealed = box_with(f"k1:{b64key(1)}").seal_values({"KEY": VALUE}, ROW)
    with pytest.raises(SecretUnreadable, match="failed authentication under key id 'k1'"):
        box_with(f"k1:{b64key(9)}").open_values(sealed, ROW)


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "key_id"])
def test_tampered_row_fails_closed(field: str) -> None:
    box = box_with(f"k1:{b64key(1)}", f"k2:{b64key(2)}")
    sealed = box.seal_values({"KEY": VALUE}, ROW)
    if field == "ciphertext":
        flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
        bad = Sealed(sealed.key_id, sealed.nonce, flipped)
    elif field == "nonce":
        bad = Sealed(sealed.key_id, bytes(12), sealed.ciphertext)
    else:  # a key id edited in the database: the other key exists but the data is bound to k1
        bad = Sealed("k2", sealed.nonce, sealed.ciphertext)
    with pytest.raises(SecretUnreadable) as caught:
        box.open_values(bad, ROW)
    assert VALUE not in str(caught.value)


@pytest.mark.parametrize("other", [
    RowBinding("org_2", "usr_1", "anthropic"),
    RowBinding("org_1", "org", "anthropic"),
    RowBinding("org_1", "usr_1", "github"),
])
def test_ciphertext_moved_to_another_row_fails(other: RowBinding) -> None:
    box = box_with(f"k1:{b64key(1)}")
    sealed = box.seal_values({"KEY": VALUE}, ROW)
    with pytest.raises(SecretUnreadable, match="failed authentication"):
        box.open_values(sealed, other)


def test_malformed_nonce_is_a_typed_error() -> None:
    box = box_with(f"k1:{b64key(1)}")
    sealed = box.seal_values({"KEY": VALUE}, ROW)
    with pytest.raises(SecretUnreadable, match="malformed nonce"):
        box.open_values(Sealed("k1", b"short", sealed.ciphertext), ROW)


def test_keyring_order_first_is_current_and_old_keys_still_open() -> None:
    old_box = box_with(f"old:{b64key(1)}")
    sealed = old_box.seal_values({"KEY": VALUE}, ROW)
    both = box_with(f"new:{b64key(2)}", f"old:{b64key(1)}")
    assert both.current_key_id == "new"
    assert both.open_values(sealed, ROW) == {"KEY": VALUE}
    assert both.seal_values({"KEY": VALUE}, ROW).key_id == "new"


def test_bare_key_gets_a_stable_fingerprint_id() -> None:
    ring = parse_keyring(b64key(3), "ORZ_SECRETS_KEY")
    assert ring.current_id == fingerprint_id(bytes([3]) * 32)
    assert ring.current_id == parse_keyring(b64key(3) + "\n", "x").current_id
    assert b64key(3) not in repr(ring)


def test_urlsafe_and_newline_separated_entries() -> None:
    key = bytes([0xFB]) * 32
    ring = parse_keyring(f"a:{base64.urlsafe_b64encode(key).decode()}\n# comment\nb:{b64key(4)}\n", "file")
    assert ring.ids == ["a", "b"] and ring.key("a") == key


@pytest.mark.parametrize(("text", "message"), [
    ("", "holds no key"),
    ("k1:not base64!!", "key id 'k1': the key is not valid base64"),
    (f"k1:{base64.b64encode(b'short').decode()}", "must decode to 32 bytes, not 5"),
    (f"bad id:{b64key(1)}", "entry 1: key ids are"),
    (f"k1:{b64key(1)},k1:{b64key(2)}", "key id 'k1' appears twice"),
])
def test_malformed_keys_are_rejected_without_echoing_them(text: str, message: str) -> None:
    with pytest.raises(SecretsKeyError, match=message) as caught:
        parse_keyring(text, "ORZ_SECRETS_KEY")
    assert b64key(1) not in str(caught.value) and b64key(2) not in str(caught.value)


def test_settings_inline_key(tmp_path: Path) -> None:
    box = SecretsBox.from_settings(Settings(data_dir=tmp_path, secrets_key=f"prod:{b64key(5)}"))  # type: ignore[arg-type]
    assert box.current_key_id == "prod"
    assert not (tmp_path / "keys").exists()


def test_settings_key_and_file_together_is_an_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secrets_key=b64key(5), secrets_key_file=tmp_path / "k")  # type: ignore[arg-type]
    with pytest.raises(SecretsKeyError, match="not both"):
        SecretsBox.from_settings(settings)


def test_settings_missing_key_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(SecretsKeyError, match="does not exist"):
        SecretsBox.from_settings(Settings(data_dir=tmp_path, secrets_key_file=tmp_path / "nope.key"))


def test_embedded_default_generates_key_file_on_first_use(tmp_path: Path) -> None:
    box = SecretsBox.from_settings(Settings(data_dir=tmp_path))
    path = tmp_path / "keys" / "secrets.key"
    assert not path.exists()  # building the box writes nothing
    sealed = box.seal_values({"KEY": VALUE}, ROW)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A second process with the same data dir reads the same key.
    again = SecretsBox.from_settings(Settings(data_dir=tmp_path))
    assert again.open_values(sealed, ROW) == {"KEY": VALUE}
    assert [p.name for p in path.parent.iterdir()] == ["secrets.key"]  # no temp files left


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "secrets.key"
    rings: list[KeyRing] = [load_or_create_key_file(path) for _ in range(3)]
    assert len({r.current_id for r in rings}) == 1


def test_file_backed_box_picks_up_a_rotated_key(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    path.write_text(f"k1:{b64key(1)}\n")
    os.chmod(path, 0o600)
    reader = SecretsBox.from_settings(Settings(data_dir=tmp_path, secrets_key_file=path))
    assert reader.current_key_id == "k1"
    new_id = prepend_new_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    writer = SecretsBox.from_settings(Settings(data_dir=tmp_path, secrets_key_file=path))
    assert writer.current_key_id == new_id and writer.ring.ids == [new_id, "k1"]
    sealed = writer.seal_values({"KEY": VALUE}, ROW)
    # The long-running reader has never seen the new key id: it reloads the file instead of failing.
    assert reader.open_values(sealed, ROW) == {"KEY": VALUE}


def test_blank_key_file_setting_means_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORZ_SECRETS_KEY_FILE", "")
    assert Settings(data_dir=tmp_path).secrets_key_file is None


def test_bare_key_id_never_changes() -> None:
    # Rows store this id: a change would make every secret sealed under a bare key unreadable.
    assert fingerprint_id(bytes([7]) * 32) == "ka7d476e376b4"


def test_key_file_readable_by_others_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "secrets.key"
    path.write_text(f"k1:{b64key(1)}\n")
    for mode, warned in ((0o600, False), (0o400, False), (0o700, False), (0o640, True), (0o604, True)):
        path.chmod(mode)
        caplog.clear()
        assert read_key_file(path).current_id == "k1"
        assert ("readable by other users" in caplog.text) is warned, oct(mode)
        if warned:
            assert str(path) in caplog.text


def test_unreadable_secrets_name_the_secret_and_key_id_for_the_response() -> None:
    box = box_with(f"k1:{b64key(1)}")
    sealed = box.seal_values({"A": "b"}, ROW)
    failures = [
        Sealed("k9", sealed.nonce, sealed.ciphertext),  # unknown key id
        Sealed("k1", b"short", sealed.ciphertext),  # malformed nonce
        Sealed("k1", sealed.nonce, sealed.ciphertext[:-1] + bytes([sealed.ciphertext[-1] ^ 1])),  # tampered
    ]
    for bad in failures:
        with pytest.raises(SecretUnreadable) as err:
            box.open_values(bad, ROW)
        assert (err.value.extra["secret"], err.value.extra["key_id"]) == ("anthropic", bad.key_id)
        assert VALUE not in str(err.value)
    not_a_dict = box.seal(b'["a"]', ROW)
    with pytest.raises(SecretUnreadable) as err:
        box.open_values(not_a_dict, ROW)
    assert str(err.value) == "secret 'anthropic' decrypted to an unexpected shape"
    assert (err.value.extra["secret"], err.value.extra["key_id"]) == ("anthropic", "k1")


@pytest.mark.parametrize("text, source, line", [
    (f"k1:{b64key(1)[:10]}!{b64key(1)[10:]}", "ORZ_SECRETS_KEY",
     "ORZ_SECRETS_KEY, key id 'k1': the key is not valid base64"),
    (f"a:b:{b64key(1)}", "ORZ_SECRETS_KEY", "ORZ_SECRETS_KEY, key id 'a': the key is not valid base64"),
    ("bm90IGEga2V5", "somewhere", "somewhere, entry 1: the key must decode to 32 bytes, not 9"),
])
def test_malformed_key_entries_are_refused_naming_where(text: str, source: str, line: str) -> None:
    with pytest.raises(SecretsKeyError) as err:
        parse_keyring(text, source)
    assert str(err.value) == line


def test_settings_name_the_variable_or_file_that_holds_a_bad_key(tmp_path: Path) -> None:
    with pytest.raises(SecretsKeyError) as err:
        SecretsBox.from_settings(Settings(data_dir=tmp_path, secrets_key="nope"))  # type: ignore[arg-type]
    assert str(err.value).startswith("ORZ_SECRETS_KEY, entry 1: ")
    bad = tmp_path / "bad.key"
    bad.write_text("nope\n")
    bad.chmod(0o600)
    with pytest.raises(SecretsKeyError) as err:
        read_key_file(bad)
    assert str(err.value).startswith(f"secrets key file {bad}, entry 1: ")
    with pytest.raises(SecretsKeyError) as err:
        read_key_file(tmp_path / "missing.key")
    assert str(err.value) == f"secrets key file {tmp_path / 'missing.key'} does not exist"
    with pytest.raises(SecretsKeyError) as err:
        read_key_file(tmp_path)  # a directory: unreadable as a file
    assert str(err.value) == f"secrets key file {tmp_path} cannot be read: Is a directory"
    with pytest.raises(SecretsKeyError) as err:
        SecretsBox.from_settings(Settings(data_dir=tmp_path, secrets_key=b64key(1),  # type: ignore[arg-type]
                                          secrets_key_file=bad))
    assert str(err.value) == "set ORZ_SECRETS_KEY or ORZ_SECRETS_KEY_FILE, not both"
    with pytest.raises(ValueError) as verr:
        SecretsBox()
    assert str(verr.value) == "SecretsBox needs a key ring or a loader"


def test_generated_key_file_in_new_or_existing_directories(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fresh = tmp_path / "new" / "secrets.key"
    ring = load_or_create_key_file(fresh)
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    # Said once, with the key id and where it is: the operator must back it up.
    assert f"generated a new secrets key (id {ring.current_id}) in {fresh}; back it up" in caplog.text
    existing = tmp_path / "existing"
    existing.mkdir()
    assert load_or_create_key_file(existing / "secrets.key").current_id.startswith("k")


def test_rotation_keeps_every_older_key(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    path.write_text(f"k1:{b64key(1)}\nk2:{b64key(2)}\n")
    path.chmod(0o600)
    new_id = prepend_new_key(path)
    ring = read_key_file(path)
    assert ring.ids[0] == new_id and list(ring.ids[1:]) == ["k1", "k2"]


def test_a_failed_authentication_says_what_may_be_wrong() -> None:
    box = box_with(f"k1:{b64key(1)}")
    sealed = box.seal(b"x", ROW)
    with pytest.raises(SecretUnreadable) as err:
        box_with(f"k1:{b64key(2)}").open(sealed, ROW)
    assert str(err.value) == (
        "secret 'anthropic' failed authentication under key id 'k1': the key with that id is not the one it was "
        "sealed with, or the stored row was altered")
