"""Several instances on PostgreSQL and Redis share everything: tokens, revocations, rate limits
and replay caches (real server processes); and Redis going away fails closed, then recovers."""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from provider import config, create_app
from provider.clients import register_client
from provider.service import Provider, initialize
from tests.conftest import PG_URL, REDIS_URL, postgres_schema
from tests.servers import redis_server, serving
from tests.support import OAuth

pytestmark = pytest.mark.server
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
needs_shared_stores = pytest.mark.skipif(
    not (PG_URL and REDIS_URL),
    reason="needs PROVIDER_TEST_DATABASE_URL and PROVIDER_TEST_REDIS_URL (CI sets both)")


def post(url: str, credentials: tuple[str, str], headers: dict | None = None,
         **form: str) -> tuple[int, dict, dict]:
    basic = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                     headers={"Authorization": f"Basic {basic}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


@pytest.fixture
def shared(tmp_path, vault_keys):
    """A deployment on a fresh PostgreSQL schema and the CI Redis, with its own issuer (so
    that its Redis keys are its own), and two clients."""
    import shutil

    shutil.copytree(vault_keys, tmp_path / "keys" / "vault")
    issuer = f"http://instances-{secrets.token_hex(4)}.test"
    config_file = tmp_path / "provider.toml"
    config_file.write_text('[rate_limits.clients]\n"limited" = "4/minute"\n')
    for url in postgres_schema():
        env = {"PROVIDER_DATABASE_URL": url, "PROVIDER_REDIS_URL": REDIS_URL,
               "PROVIDER_KEYS_DIR": str(tmp_path / "keys"), "PROVIDER_ISSUER": issuer,
               "PROVIDER_CONFIG": str(config_file)}
        settings = config.load(environ=env)
        initialize(settings)
        provider = Provider(settings)
        clients = {}
        for name, options in {"svc": {}, "limited": {}, "rs": {"introspect": True}}.items():
            _, secret = register_client(
                provider.storage, provider.hasher, issuer=issuer, max_ttl=3600, client_id=name,
                grant_types=["client_credentials", EXCHANGE], scope="read write", **options)
            clients[name] = (name, secret)
        provider.storage.engine.dispose()
        yield env, clients, issuer


@needs_shared_stores
def test_two_instances_share_tokens_revocations_limits_and_replay_caches(shared):
    env, clients, issuer = shared
    with serving(env) as first, serving(env) as second:
        # A token issued by one instance is introspected by the other.
        _, issued, _ = post(f"{first}/token", clients["svc"], grant_type="client_credentials")
        token = issued["access_token"]
        assert post(f"{second}/introspect", clients["rs"], token=token)[1]["active"] is True

        # A revocation on one holds on the other within a second.
        assert post(f"{second}/revoke", clients["svc"], token=token)[0] == 200
        time.sleep(1.0)
        assert post(f"{first}/introspect", clients["rs"], token=token)[1] == {"active": False}

        # Rate limits count across both: 4 per minute in all, whichever instance is asked.
        answers = [post(f"{url}/token", clients["limited"], grant_type="client_credentials")
                   for url in (first, second, first, second, first)]
        assert [a[0] for a in answers] == [200, 200, 200, 200, 429]
        assert answers[-1][1]["error"] == "temporarily_unavailable"
        assert int(answers[-1][2]["Retry-After"]) >= 1

        # A DPoP proof spent on one instance is refused by the other.
        key = ECKey.generate_key("P-256")
        proof = jose_jwt.encode(
            {"alg": "ES256", "typ": "dpop+jwt", "jwk": key.as_dict(private=False)},
            {"jti": secrets.token_urlsafe(12), "htm": "POST", "htu": f"{issuer}/token",
             "iat": int(time.time())}, key)
        assert post(f"{first}/token", clients["svc"], {"DPoP": proof},
                    grant_type="client_credentials")[0] == 200
        status, body, _ = post(f"{second}/token", clients["svc"], {"DPoP": proof},
                               grant_type="client_credentials")
        assert (status, body["error"]) == (400, "invalid_dpop_proof")


def test_serve_warns_of_per_process_limits_and_logs_audit_events_as_json_lines(tmp_path,
                                                                             vault_keys):
    import shutil

    shutil.copytree(vault_keys, tmp_path / "keys" / "vault")
    env = {"PROVIDER_DATABASE_URL": f"sqlite:///{tmp_path}/p.db",
           "PROVIDER_KEYS_DIR": str(tmp_path / "keys"), "PROVIDER_CONFIG": str(tmp_path / "p.toml")}
    (tmp_path / "p.toml").write_text("")
    settings = config.load(environ=env)
    initialize(settings)
    provider = Provider(settings)
    _, secret = register_client(provider.storage, provider.hasher, issuer=settings.issuer,
                                max_ttl=3600, client_id="svc", grant_types=["client_credentials"],
                                scope="read")
    provider.storage.engine.dispose()
    with serving(env, workers=2, capture_stderr=True) as (url, stderr):
        assert "rate limits count per worker process" in stderr()
        status, issued, _ = post(f"{url}/token", ("svc", secret), grant_type="client_credentials")
        assert status == 200
        post(f"{url}/token", ("svc", "wrong"), grant_type="client_credentials")
        deadline = time.monotonic() + 5  # audit lines are written in batches, every 0.5 s
        while '"invalid_client"' not in stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        written = stderr()
    events = [json.loads(line) for line in written.splitlines() if line.startswith("{")]
    issued_events = [e for e in events if e["type"] == "token.issued"]
    assert issued_events and issued_events[0]["client_id"] == "svc"
    assert any(e["type"] == "refusal" and e["error"] == "invalid_client" for e in events)
    assert issued["access_token"] not in written and secret not in written


def test_redis_going_away_fails_closed_and_recovers(tmp_path, vault_keys, monkeypatch):
    """Requests that need Redis (rate limits, replay caches) answer 503 while it is gone, and
    the instance serves again as soon as it is back, without a restart."""
    import shutil

    shutil.copytree(vault_keys, tmp_path / "keys" / "vault")
    with redis_server() as (redis_url, port):
        overrides = {"issuer": "http://localhost", "database_url": f"sqlite:///{tmp_path}/p.db",
                     "keys_dir": str(tmp_path / "keys"), "redis_url": redis_url}
        initialize(config.load(overrides=overrides))
        app = create_app(overrides)
        oauth = OAuth(app, app.test_client())
        svc = oauth.register("svc")
        assert oauth.token(svc).status_code == 200
    # Redis is gone.
    down = oauth.token(svc)
    assert down.status_code == 503
    assert down.get_json()["error"] == "temporarily_unavailable"
    assert oauth.http.get("/healthz").status_code == 503
    with redis_server(port):
        assert oauth.token(svc).status_code == 200
        assert oauth.http.get("/healthz").status_code == 200
    app.extensions["provider"].storage.engine.dispose()
