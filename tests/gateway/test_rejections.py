"""Every credential the gateway must refuse, and the one line the user reads for each."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import asyncssh
import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec

from api.credentials import jwt as attach_jwt
from gateway.server import Gateway
from tests.gateway.conftest import SESSION, TEAMMATE, USER, Env, run
from tests.gateway.standins import FakeSession
from tests.support import free_port


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"iss": "orz-api", "aud": "orz-gateway", "sub": USER, "sid": SESSION,
                                 "iat": now, "exp": now + 60, "jti": "forged"}
    claims.update(over)
    return claims


async def _cert_login(env: Env, cert_kw: dict[str, object]) -> tuple[int, bytes]:
    cert = env.certificate(**cert_kw)  # type: ignore[arg-type]
    result = await env.ssh(*env.cert_args(cert), "--", "echo in")
    assert result.stdout != b"in\n"
    return result.returncode, result.stderr


async def _token_login(env: Env, token: str) -> tuple[int, bytes, bytes]:
    result = await env.ssh(*env.token_args(), "--", "echo in", env=env.password_env(token))
    return result.returncode, result.stdout, result.stderr


async def test_expired_certificate(env: Env) -> None:
    code, err = await _cert_login(env, {"ttl_s": 60, "now": time.time() - 600})
    assert code == 255 and b"certificate expired" in err and b"Permission denied" in err


async def test_certificate_for_another_session(env: Env) -> None:
    code, err = await _cert_login(env, {"session_id": "other-session"})
    assert code == 255 and b"not for session demo-1" in err


async def test_certificate_from_another_ca(env: Env) -> None:
    code, err = await _cert_login(env, {"ca": asyncssh.generate_private_key("ssh-ed25519")})
    assert code == 255 and b"not signed by Orzbob Cloud" in err
    assert env.api.authorize_calls == []


async def test_bare_key_not_accepted(env: Env) -> None:
    key = env.user_key("bare")
    result = await env.ssh("-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                           "-o", "PreferredAuthentications=publickey", "--", "echo in")
    assert result.returncode == 255 and b"Permission denied" in result.stderr


async def test_jwt_expired(env: Env) -> None:
    token = attach_jwt.issue(env.jwt_key, user_id=USER, session_id=SESSION, ttl_s=10,
                             now=time.time() - 120).token
    code, out, err = await _token_login(env, token)
    assert code == 255 and out == b"" and b"attach token expired" in err


async def test_jwt_for_another_session(env: Env) -> None:
    code, out, err = await _token_login(env, env.token(session_id="other-session"))
    assert code == 255 and out == b"" and b"not for session demo-1" in err


async def test_jwt_signed_with_another_key(env: Env) -> None:
    token = attach_jwt.issue(ec.generate_private_key(ec.SECP256R1()), user_id=USER, session_id=SESSION,
                             ttl_s=60).token
    code, out, err = await _token_login(env, token)
    assert code == 255 and out == b"" and b"attach token is not valid" in err


async def test_jwt_alg_none(env: Env) -> None:
    token = f"{_b64(json.dumps({'alg': 'none'}).encode())}.{_b64(json.dumps(_claims()).encode())}."
    code, out, _ = await _token_login(env, token)
    assert code == 255 and out == b""


async def test_jwt_hs256_with_public_key_as_secret(env: Env) -> None:
    secret = attach_jwt.public_pem(env.jwt_key)
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}." \
                    f"{_b64(json.dumps(_claims()).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    code, out, _ = await _token_login(env, f"{signing_input}.{_b64(sig)}")
    assert code == 255 and out == b""
    assert env.api.authorize_calls == []


async def test_jwt_used_twice(env: Env) -> None:
    token = env.token()
    first = await _token_login(env, token)
    assert first[0] == 0 and first[1] == b"in\n"
    code, out, err = await _token_login(env, token)
    assert code != 0 and out == b""
    assert b"orz: this attach token was already used" in err


async def test_user_disabled_after_issue(env: Env) -> None:
    cert = env.certificate()
    env.api.disabled_users.add(USER)
    result = await env.ssh(*env.cert_args(cert), "--", "echo in")
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.strip().splitlines()[-1] == b"orz: your account is disabled"


async def test_someone_elses_session_looks_missing(env: Env) -> None:
    env.api.sessions["bobs"] = FakeSession(owner="usr_bob", route=env.runner.route)
    result = await env.ssh(*env.cert_args(env.certificate(session_id="bobs")), "--", "echo in",
                           session_id="bobs")
    assert result.returncode == 1 and b"orz: no such session: bobs" in result.stderr
    missing = await env.ssh(*env.cert_args(env.certificate(session_id="nope")), "--", "echo in",
                            session_id="nope")
    assert b"orz: no such session: nope" in missing.stderr


async def test_a_teammates_session_is_refused_with_why(env: Env) -> None:
    env.api.sessions["carols"] = FakeSession(owner=TEAMMATE, route=env.runner.route)
    result = await env.ssh(*env.cert_args(env.certificate(session_id="carols")), "--", "echo in",
                           session_id="carols")
    assert result.returncode == 1 and b"orz: session carols belongs to someone else in your org" in result.stderr
    assert b"in\n" not in result.stdout


async def test_failed_session_says_why(env: Env) -> None:
    env.api.sessions[SESSION].state = "failed"
    env.api.sessions[SESSION].reason = "clone failed: repository not found"
    result = await env.ssh("-tt", *env.cert_args())
    assert result.returncode == 1
    assert f"orz: session {SESSION} failed: clone failed: repository not found".encode() in result.stderr


async def test_failed_authentications_rate_limited(env: Env) -> None:
    bad = pyjwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    for _ in range(env.settings.auth_fail_limit):
        code, _, _ = await _token_login(env, bad)
        assert code == 255
    # Now even a good credential from this address is turned away until the window passes.
    result = await env.ssh(*env.cert_args(), "--", "echo in")
    assert result.returncode == 255 and result.stdout == b""
    assert b"too many failed authentications" in result.stderr
    assert env.gateway.limiter.blocked("127.0.0.1")


async def test_a_failed_session_is_not_held_against_the_address(env: Env) -> None:
    """Found by the soak: retries against a session that had failed (its runner killed) counted as failed
    authentications, and after ten every user behind the same address was turned away."""
    env.api.sessions[SESSION].state = "failed"
    env.api.sessions[SESSION].reason = "compute vanished"
    for _ in range(env.settings.auth_fail_limit + 2):
        result = await env.ssh(*env.cert_args(), "--", "echo in")
        assert result.returncode == 1 and b"failed: compute vanished" in result.stderr
    assert not env.gateway.limiter.blocked("127.0.0.1")
    env.api.sessions[SESSION].state = "running"
    result = await env.ssh(*env.cert_args(), "--", "echo in")
    assert result.returncode == 0 and result.stdout == b"in\n"


async def test_failed_authentications_count_across_gateway_replicas(env: Env) -> None:
    """One limit for all replicas: a source that used it up on one is refused by the next after one try."""
    second = Gateway(env.settings.model_copy(update={"gateway_metrics_port": free_port()}))
    await second.start()
    try:
        host_pub = second.host_key.export_public_key().decode().strip()
        with env.known_hosts.open("a") as known:
            known.write(f"[127.0.0.1]:{second.port} {host_pub}\n")
        bad = pyjwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
        for _ in range(env.settings.auth_fail_limit):
            code, _, _ = await _token_login(env, bad)
            assert code == 255
        await wait_for(lambda: env.api.auth_failures.get("127.0.0.1") == env.settings.auth_fail_limit)
        assert not second.limiter.blocked("127.0.0.1"), "the second replica has seen nothing itself yet"
        on_second = [str(second.port) if arg == str(env.port) else arg for arg in env.base_args()]
        target = f"{SESSION}@127.0.0.1"
        first_try = await run(*on_second, *env.token_args(), "--", "echo in", env=env.password_env(bad),
                              target=target)
        assert first_try.returncode == 255
        await wait_for(lambda: second.limiter.blocked("127.0.0.1"))
        # Now even a good credential from this address is turned away by the second replica.
        result = await run(*on_second, *env.cert_args(), "--", "echo in", target=target)
        assert result.returncode == 255 and result.stdout == b""
        assert b"too many failed authentications" in result.stderr
    finally:
        await second.close()


async def wait_for(check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_unreachable_runner_says_so(env: Env) -> None:
    closed_port = free_port()
    env.api.sessions[SESSION].route = {**env.runner.route, "port": closed_port}
    result = await env.ssh(*env.cert_args(), "--", "echo in")
    assert result.returncode == 1 and result.stdout == b""
    assert b"orz: session is not reachable right now" in result.stderr


async def test_wrong_runner_host_key_is_not_trusted(env: Env) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    env.api.sessions[SESSION].route = {**env.runner.route, "host_key": other}
    result = await env.ssh(*env.cert_args(), "--", "echo in")
    assert result.returncode == 1 and result.stdout == b""
    assert env.runner.usernames == []
