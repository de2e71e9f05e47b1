"""`orz cloud login` warns before it sends a login over plain http to another machine: the token, and
the gateway host key the CLI pins from the API's answers, would cross the network unprotected."""

from __future__ import annotations

import pytest

from cli.config import cleartext_problem


@pytest.mark.parametrize("url", [
    "https://orz.example.com", "http://127.0.0.1:8080", "http://127.8.9.10:8080", "http://localhost:8080",
    "http://api.localhost", "http://[::1]:8080", "HTTP://LOCALHOST",
])
def test_encrypted_or_this_machine_is_fine(url: str) -> None:
    assert cleartext_problem(url) is None


@pytest.mark.parametrize("url", [
    "http://orz.example.com", "http://10.0.0.5:8080", "http://192.0.2.2", "http://[fd00::2]:8080",
    "http://localhost.example.com",
])
def test_plain_http_to_another_machine_is_named(url: str) -> None:
    problem = cleartext_problem(url)
    assert problem is not None and url in problem and "https://" in problem
