"""`orz cloud webhook` end to end: the real command against a real API and a real receiver."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from api.settings import Settings
from tests.cli.conftest import LiveApi, Orz
from tests.cli.test_cloud_commands import assert_one_error_line
from tests.conftest import Tenant
from tests.webhook_receiver import Receiver


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"webhook_allow_hosts": "127.0.0.1"})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_add_test_log_list_rm(orz: Orz, live_api: LiveApi, logged_in: Tenant, receiver: Receiver) -> None:
    added = orz("cloud", "webhook", "add", receiver.url, "--event", "agent.needs_input", "--event", "session.failed")
    assert added.returncode == 0, added.stderr
    hook_id = added.stdout.split()[1]
    secret = added.stdout.split("(shown only now; keep it to verify deliveries): ")[1].split()[0]
    assert secret.startswith("whsec_") and "events: agent.needs_input, session.failed" in added.stdout
    receiver.secret = secret

    tested = orz("cloud", "webhook", "test", hook_id)
    assert tested.returncode == 0, tested.stderr
    assert "delivered: the receiver answered 200" in tested.stdout
    assert receiver.got[0].verified and receiver.got[0].json["event"] == "webhook.test"

    receiver.statuses = [404]
    assert_one_error_line(orz("cloud", "webhook", "test", hook_id), "not delivered", "404")
    logged = orz("cloud", "webhook", "log", hook_id, "--json")
    assert [(d["state"], d["status_code"]) for d in json.loads(logged.stdout)["deliveries"]] == [
        ("failed", 404), ("delivered", 200)]
    listed = orz("cloud", "webhook", "list")
    as_json = orz("cloud", "webhook", "list", "--json")
    for done in (tested, logged, listed, as_json):
        assert secret not in done.stdout + done.stderr
    assert hook_id in listed.stdout and json.loads(as_json.stdout)["webhooks"][0]["format"] == "json"

    assert orz("cloud", "webhook", "rm", hook_id).returncode == 0
    missing = orz("cloud", "webhook", "rm", hook_id)
    assert_one_error_line(missing, f"no webhook {hook_id}")
    assert missing.returncode == 3


def test_a_private_or_plain_http_url_is_one_readable_error(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    refused = orz("cloud", "webhook", "add", "https://192.168.1.10/hook")
    assert_one_error_line(refused, "public https:// address", "ORZ_WEBHOOK_ALLOW_HOSTS")
    plain = orz("cloud", "webhook", "add", "http://example.com/hook")
    assert_one_error_line(plain, "public https:// address")
    too_long = orz("cloud", "webhook", "add", "https://example.com/" + "x" * 2100)  # refused before the API
    assert_one_error_line(too_long, "invalid webhook url")
    # Bad input, as a --repo the API refuses: exit 2 (docs/cli.md), not 1 (a failure worth retrying).
    bad_repo = orz("cloud", "new", "--no-attach", "--repo", "https://192.168.1.10/app.git")
    assert_one_error_line(bad_repo, "public git server", "ORZ_REPO_ALLOW_HOSTS")
    assert (refused.returncode, plain.returncode, too_long.returncode, bad_repo.returncode) == (2, 2, 2, 2)
    assert "no webhooks" in orz("cloud", "webhook", "list").stdout
