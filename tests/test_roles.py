"""The role split and the gateway's refresh, across real ``token-provider serve`` processes
(CONTRACT.md "Vault and gateway"; THREATS.md promises 5, 10 and 11).

One deployment per backend: one database, one fake upstream, and three server processes on
it: a ``web`` instance whose keys directory has no ``vault/private.pem`` (a copy of the
deployment's keys without it), and two ``gateway`` instances with the private key.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from provider import config
from provider.clients import register_client
from provider.config import ConfigError
from provider.connections import deposit
from provider.service import Provider, initialize
from provider.vault import Vault, VaultError
from tests.conftest import BACKENDS, postgres_schema
from tests.servers import free_port, serving
from tests.support import Registered
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.server
ISSUER = "http://provider.test"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


@dataclass
class Deployment:
    upstream: FakeUpstream
    keys_dir: Path  # the full keys, vault private key included
    web_keys_dir: Path  # the same without vault/private.pem
    web_env: dict[str, str]
    gateway_env: dict[str, str]
    app: Registered  # --connections, exchange, refresh_token
    web: str = ""
    gateways: tuple[str, ...] = ()


@pytest.fixture(scope="module", params=BACKENDS)
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               vault_keys: Path) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("roles")
    urls = postgres_schema() if request.param == "postgresql" else iter([f"sqlite:///{base}/provider.db"])
    database_url = next(urls)
    with FakeUpstream().start() as upstream, pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("PROVIDER_") and not name.startswith("PROVIDER_TEST_"):
                patch.delenv(name)
        (base / "provider.toml").write_text(upstream.config_table())
        keys = base / "keys"
        shutil.copytree(vault_keys, keys / "vault")
        common = {"PROVIDER_DATABASE_URL": database_url, "PROVIDER_ISSUER": ISSUER,
                  "PROVIDER_CONFIG": str(base / "provider.toml")}
        settings = config.load(environ={**common, "PROVIDER_KEYS_DIR": str(keys)})
        initialize(settings)
        shutil.copytree(keys, base / "web-keys", ignore=shutil.ignore_patterns("private.pem"))
        assert not (base / "web-keys" / "vault" / "private.pem").exists()
        provider = Provider(settings)
        _, secret = register_client(
            provider.storage, provider.hasher, issuer=ISSUER, max_ttl=3600, client_id="app",
            grant_types=["refresh_token", EXCHANGE], scope="files:read", connections=True)
        register_client(provider.storage, provider.hasher, issuer=ISSUER, max_ttl=3600,
                        client_id="ip-bound", grant_types=["refresh_token"], scope="files:read",
                        connections=True, allowed_ips=["10.0.0.0/8"])
        provider.storage.engine.dispose()
        found = Deployment(upstream, keys, base / "web-keys",
                           web_env={**common, "PROVIDER_KEYS_DIR": str(base / "web-keys")},
                           gateway_env={**common, "PROVIDER_KEYS_DIR": str(keys)},
                           app=Registered("app", secret))
        with serving(found.web_env, "--role", "web") as web, \
                serving(found.gateway_env, "--role", "gateway", workers=2) as first, \
                serving(found.gateway_env, "--role", "gateway", workers=2) as second:
            found.web, found.gateways = web, (first, second)
            yield found
    next(urls, None)  # drops the PostgreSQL schema


def send(url: str, method: str = "GET", *, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """One request with the path exactly as written (no client-side normalisation)."""
    parts = urlsplit(url)
    target = url[len(f"{parts.scheme}://{parts.netloc}"):]
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        is_json = response.headers.get_content_type() == "application/json"
        return response.status, dict(response.headers), json.loads(data) if is_json else data
    finally:
        connection.close()


def deposited(deployment: Deployment, subject: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A deposit at the web instance: (the upstream's tokens, the provider's answer)."""
    upstream_tokens = deployment.upstream.issue_tokens()
    status, _, answer = send(f"{deployment.web}/connections", "POST",
                             headers={**deployment.app.basic, "Content-Type": "application/json"},
                             body=json.dumps({
                                 "subject": subject, "upstream": "drive",
                                 "access_token": upstream_tokens["access_token"],
                                 "refresh_token": upstream_tokens["refresh_token"],
                                 "expires_in": 3600}).encode())
    assert status == 201, answer
    return upstream_tokens, answer


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refresh_grants(upstream: FakeUpstream) -> int:
    return sum(r.get("grant_type") == "refresh_token" for r in upstream.token_requests)


def test_web_instance_without_the_vault_private_key_deposits_but_never_forwards(
        deployment: Deployment) -> None:
    _, answer = deposited(deployment, "web-user")
    seen = len(deployment.upstream.requests)
    status, headers, body = send(f"{deployment.web}/gateway/drive/files/abc",
                                 headers=bearer(answer["access_token"]))
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert headers.get("Cache-Control") == "no-store"
    assert len(deployment.upstream.requests) == seen


def test_gateway_instance_forwards_a_call_with_a_token_the_web_instance_issued(
        deployment: Deployment) -> None:
    upstream_tokens, answer = deposited(deployment, "gateway-user")
    for gateway in deployment.gateways:
        status, _, body = send(f"{gateway}/gateway/drive/files/abc",
                               headers=bearer(answer["access_token"]))
        assert status == 200, body
        assert body["path"] == "/api/files/abc"
        forwarded = deployment.upstream.requests[-1]
        assert forwarded.header("Authorization") == f"Bearer {upstream_tokens['access_token']}"


@pytest.mark.parametrize("role", ["gateway", "all"])
def test_a_decrypting_role_without_the_vault_private_key_fails_at_start_up(
        deployment: Deployment, role: str) -> None:
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "provider", "serve", "--role", role, "--port", str(free_port())],
        env={**os.environ, **deployment.web_env}, capture_output=True, text=True, timeout=60,
        check=False)
    assert finished.returncode == 2, finished.stderr[-2000:]
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), finished.stderr[-2000:]
    assert "private.pem" in lines[0] and "Traceback" not in finished.stderr
    assert time.monotonic() - started < 30


def test_web_vault_seals_for_the_gateway_and_never_opens(deployment: Deployment) -> None:
    web = Vault.load(str(deployment.web_keys_dir), "web")
    assert web.can_open is False
    sealed = web.seal("record-1", "drive", b"upstream-secret-value")
    with pytest.raises(VaultError):
        web.open("record-1", "drive", sealed)
    assert b"upstream-secret-value" not in sealed
    gateway = Vault.load(str(deployment.keys_dir), "gateway")
    assert gateway.can_open is True
    assert gateway.open("record-1", "drive", sealed) == b"upstream-secret-value"
    for role in ("gateway", "all"):
        with pytest.raises(ConfigError, match=r"private\.pem"):
            Vault.load(str(deployment.web_keys_dir), role)


@pytest.mark.parametrize("attempt", range(3))
def test_two_gateway_processes_refresh_an_expired_upstream_token_exactly_once(
        deployment: Deployment, attempt: int) -> None:
    upstream = deployment.upstream
    upstream_tokens, answer = deposited(deployment, f"concurrent-{attempt}")
    token = answer["access_token"]
    # Every worker of both processes may now hold the credential in its cache.
    for _ in range(6):
        for gateway in deployment.gateways:
            assert send(f"{gateway}/gateway/drive/files/abc", headers=bearer(token))[0] == 200
    upstream.expire(upstream_tokens["access_token"])
    before = refresh_grants(upstream)

    def one_call(index: int) -> int:
        gateway = deployment.gateways[index % 2]
        return send(f"{gateway}/gateway/drive/files/abc", headers=bearer(token))[0]

    calls = len(upstream.requests)
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one_call, range(8)))
    assert statuses == [200] * 8
    # Each worker that held the old credential got a 401 and retried: at least two did, so the
    # single refresh below was contended, not merely sequential.
    assert len(upstream.requests) - calls >= 10
    assert refresh_grants(upstream) - before == 1
    # The refreshed credential is the one every later call carries.
    assert send(f"{deployment.gateways[1]}/gateway/drive/files/abc", headers=bearer(token))[0] == 200
    assert upstream.requests[-1].header("Authorization").split()[1] in upstream.valid_access_tokens()


@pytest.mark.parametrize("path", [
    "/files/abc/../other", "/files/./abc", "/files/%2e%2e/other", "/files/abc%2Fother",
    "/files/abc%2fother", "/files/ab%5Cc", "/files//abc", "/files/abc/", "/Files/abc",
    "/files/abc%00",
])
def test_path_tricks_through_a_real_server_never_reach_the_upstream(
        deployment: Deployment, path: str) -> None:
    """What gunicorn hands the app (RAW_URI) is what the gateway judges."""
    _, answer = deposited(deployment, "paths")
    seen = len(deployment.upstream.requests)
    status, _, body = send(f"{deployment.gateways[0]}/gateway/drive{path}",
                           headers=bearer(answer["access_token"]))
    assert (status, body["error"]) == (404, "not_found")
    assert len(deployment.upstream.requests) == seen


@pytest.mark.parametrize("spoof", [
    {"X-Forwarded-For": "10.1.2.3"}, {"Forwarded": "for=10.1.2.3"}, {"X-Real-IP": "10.1.2.3"},
    {"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "a.test"},
], ids=["x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-all"])
def test_spoofed_forwarding_headers_do_not_move_the_caller_into_an_allowed_range(
        deployment: Deployment, spoof: dict[str, str]) -> None:
    """A client bound to 10.0.0.0/8 calls from 127.0.0.1 claiming to be 10.1.2.3."""
    provider = Provider(config.load(environ=deployment.gateway_env))
    try:
        client = provider.clients.get("ip-bound")
        issued = deposit(provider, client, {
            "subject": "ip-bound-user", "upstream": "drive",
            "access_token": deployment.upstream.issue_tokens()["access_token"]})
    finally:
        provider.storage.engine.dispose()
    seen = len(deployment.upstream.requests)
    status, _, body = send(f"{deployment.gateways[0]}/gateway/drive/files/abc",
                           headers={**bearer(issued["access_token"]), **spoof})
    assert (status, body["error"]) == (403, "access_denied")
    assert len(deployment.upstream.requests) == seen
