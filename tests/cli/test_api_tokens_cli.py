"""`orz cloud api-token` end to end: mint a token for CI, log a second machine in with it, revoke it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import LiveApi, Orz
from tests.cli.test_cloud_commands import assert_one_error_line
from tests.conftest import Tenant


def test_mint_use_list_and_revoke(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    made = orz("cloud", "api-token", "create", "ci", "--expires-in-days", "7")
    assert made.returncode == 0, made.stderr
    minted = made.stdout.strip()  # stdout holds the token alone: `TOKEN=$(orz cloud api-token create ci)`
    assert minted.startswith("orz_") and "\n" not in minted
    assert "shown only now" in made.stderr and "orz cloud login --token" in made.stderr

    ci = Orz(tmp_path / "ci-home")  # another machine, logged in with the minted token
    ci.home.mkdir()
    assert ci("cloud", "login", "--token", minted, "--api-url", live_api.url).returncode == 0
    assert ci("cloud", "list").returncode == 0
    assert "via an API token of your own" in ci("cloud", "whoami").stdout

    listed = orz("cloud", "api-token", "list")
    assert listed.returncode == 0, listed.stderr
    assert minted not in listed.stdout and logged_in.token not in listed.stdout
    rows = json.loads(orz("cloud", "api-token", "list", "--json").stdout)["tokens"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["default"]["current"] and not by_name["ci"]["current"]
    # The CLI's own login is named, and every token is one line in 80 columns, whatever its name.
    assert f"this CLI's login: {by_name['default']['id']}" in listed.stdout
    server = orz("cloud", "api-token", "create", "orz-server")  # the name `orz server`'s login has
    laptop = Orz(tmp_path / "laptop-home")
    laptop.home.mkdir()
    assert laptop("cloud", "login", "--token", server.stdout.strip(), "--api-url", live_api.url).returncode == 0
    table = laptop("cloud", "api-token", "list").stdout.splitlines()
    assert len(table) == 1 + 3 + 1, table  # the header, default, ci and orz-server, and the login's line
    assert [line.split()[1] for line in table[1:4]].count("orz-server") == 1
    assert table[-1].startswith("this CLI's login: tok_")

    gone = orz("cloud", "api-token", "revoke", by_name["ci"]["prefix"])
    assert gone.returncode == 0 and "revoked" in gone.stdout and "this CLI's login" not in gone.stderr
    refused = ci("cloud", "list")
    assert refused.returncode != 0 and "revoked" in refused.stderr  # the CI machine is out
    again = orz("cloud", "api-token", "revoke", by_name["ci"]["id"])
    assert_one_error_line(again, f"no API token {by_name['ci']['id']}")
    assert again.returncode == 3


def test_a_token_is_revoked_by_its_name(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    made = orz("cloud", "api-token", "create", "deploy-bot")
    assert made.returncode == 0, made.stderr
    gone = orz("cloud", "api-token", "revoke", "deploy-bot")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.startswith("API token tok_") and "(deploy-bot) revoked" in gone.stdout
    assert "deploy-bot" not in orz("cloud", "api-token", "list").stdout


def test_revoking_the_clis_own_token_says_to_log_in_again(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    own = json.loads(orz("cloud", "api-token", "list", "--json").stdout)["tokens"][0]
    done = orz("cloud", "api-token", "revoke", own["id"])
    assert done.returncode == 0 and "orz cloud login" in done.stderr
    assert orz("cloud", "list").returncode != 0


def test_a_bad_name_is_one_readable_error(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    bad = orz("cloud", "api-token", "create", "x" * 65)
    assert_one_error_line(bad, "invalid token name")
    assert bad.returncode == 2
    assert len(json.loads(orz("cloud", "api-token", "list", "--json").stdout)["tokens"]) == 1


def test_an_id_with_a_slash_reaches_no_other_route(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    """`revoke ../instances/ID` went out as DELETE /v1/instances/ID: ids typed by users are one path segment."""
    import httpx

    made = httpx.post(f"{live_api.url}/v1/instances", json={}, headers=logged_in.headers, timeout=10)
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    refused = orz("cloud", "api-token", "revoke", f"../instances/{sid}")
    assert refused.returncode == 3 and "no API token" in refused.stderr, refused.stderr
    after = httpx.get(f"{live_api.url}/v1/instances/{sid}", headers=logged_in.headers, timeout=10).json()
    assert after["status"] not in ("deleting", "deleted")


def test_a_pasted_token_value_is_refused_and_never_repeated(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    """Revoking by value would put the token in the request's path (the API's access log): refused locally."""
    refused = orz("cloud", "api-token", "revoke", logged_in.token)
    assert_one_error_line(refused, "looks like a token's value")
    assert refused.returncode == 2 and logged_in.token not in refused.stdout + refused.stderr
    assert orz("cloud", "list").returncode == 0  # and nothing was revoked
