"""Hostile calls to the gateway, ``ANY /gateway/{upstream}/{path}`` (CONTRACT.md "Vault and
gateway"; THREATS.md promises 9, 10 and 11).

One table: each row is a request and the exact status and ``error`` it must get. Every row
also holds the gateway to its invariants:

- a refused call never reaches an upstream: no upstream sees a single byte of it (the spy
  upstreams below record a request as soon as its headers arrive, before its body is read),
  and it changes nothing (no connection, refresh token, revocation, code or connect-request
  row is written or edited; read straight from the tables);
- a forwarded call reaches the upstream exactly once, with the real method, exactly at the path
  that was authorised;
- no answer carries an upstream secret (its access or refresh tokens, the provider's client
  secret at the upstream), an upstream cookie or an upstream challenge; every error is JSON
  with ``Cache-Control: no-store``.

The table shares one provider and four upstreams per module (``drive``, ``drive2``, ``slow``,
and ``dead`` whose port is closed); each row deposits connections of its own, for a subject of
its own, so rows never see each other's state. ``gateway.max_body_bytes`` is 1024 and
``gateway.read_timeout`` 1 second for the whole module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from provider import config, create_app
from provider.service import initialize
from provider.storage import schema
from tests.servers import free_port
from tests.support import EXCHANGE, ISSUER, OAuth, Registered, claims_of
from tests.upstream import FakeUpstream, Recorded

GATEWAY = f"{ISSUER}/gateway"
RATE_LIMITS_OFF = {"token": "100000/minute", "introspect": "100000/minute",
                   "failed_client_auth": "100000/minute", "gateway": "100000/minute",
                   "suspend": {"gateway": "100000/minute"}}
MAX_BODY = 1024
READ_TIMEOUT = 1  # whole seconds: see test_gateway_timeouts_accept_fractional_seconds
SLOW_DELAY = 3.0
BARE_CHALLENGE = 'Bearer realm="token-provider"'
# Tables a refused request must leave exactly as they were.
STATE_TABLES = (schema.connections, schema.refresh_tokens, schema.revocations,
                schema.authorization_codes, schema.connect_requests)
FILE_ROUTES = [{"method": "GET", "path": "/files/{id}", "scope": "files:read"},
               {"method": "PUT", "path": "/files/{id}", "scope": "files:write"},
               {"method": "POST", "path": "/echo", "scope": "files:write"}]


# Upstreams that record every arrival ----------------------------------------------------------


class SpyUpstream(FakeUpstream):
    """A :class:`FakeUpstream` that also records each API request the moment its headers
    arrive (``arrivals``), before its body is read, so that a request cut off mid-body still
    counts as having reached the upstream; keeps every token it ever minted (``minted``); and
    answers ``/api/files/challenge`` with upstream challenges and a second cookie."""

    def __init__(self, name: str) -> None:
        super().__init__(client_id=f"provider-at-{name}",
                         client_secret=f"{name}-client-secret-{secrets.token_hex(8)}")
        self.arrivals: list[tuple[str, str]] = []
        self.minted: list[str] = []

    def _mint(self, scope: str, expires_in: int) -> dict[str, Any]:
        tokens = super()._mint(scope, expires_in)
        self.minted += [tokens["access_token"], tokens["refresh_token"]]
        return tokens

    def secrets(self) -> list[str]:
        with self._lock:
            return [self.client_secret, *self.minted]

    def wsgi_app(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/api" or path.startswith("/api/"):
            raw = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or path).split("?")[0]
            with self._lock:
                self.arrivals.append((environ["REQUEST_METHOD"], raw))
        if path != "/api/files/challenge":
            return super().wsgi_app(environ, start_response)

        def challenging(status: str, headers: list, exc_info: Any = None) -> Any:
            return start_response(status, [
                *headers, ("WWW-Authenticate", f'Bearer realm="{self.client_secret}"'),
                ("Proxy-Authenticate", 'Basic realm="upstream"'),
                ("Set-Cookie", f"second={self.client_secret}; HttpOnly")], exc_info)

        return super().wsgi_app(environ, challenging)


def upstream_settings(fake: FakeUpstream | None, routes: list[dict[str, str]],
                      base_url: str | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"base_url": base_url or (fake.base_url if fake else ""),
                                "routes": routes, "scopes": ["files.read"]}
    if fake is not None:
        settings.update(authorize_url=fake.authorize_url, token_url=fake.token_url,
                        client_id=fake.client_id, client_secret=fake.client_secret)
    return settings


# One provider for the module ------------------------------------------------------------------


@dataclass
class World:
    """The module's provider, its upstreams and its long-lived clients."""

    app: Any
    overrides: dict[str, Any]  # what create_app was given: another instance on the same state
    keys_dir: Path
    upstreams: dict[str, SpyUpstream]
    app_client: Registered  # --connections, exchange, authorization_code, refresh_token
    cc_client: Registered  # client_credentials only, audience the issuer
    cc_gateway: Registered  # client_credentials with audience {issuer}/gateway/drive
    ip_bound: Registered  # like app_client, but --allow-ip 10.0.0.0/8

    @cached_property
    def oauth(self) -> OAuth:
        return OAuth(self.app, self.app.test_client())

    @property
    def engine(self) -> sa.Engine:
        return self.app.extensions["provider"].storage.engine

    @cached_property
    def outbound(self) -> list[tuple[str, str]]:
        """Every request the provider starts towards any upstream (API call or token
        endpoint), recorded synchronously as it is made: unlike what an upstream records,
        this cannot lag behind the provider's answer."""
        http = self.app.extensions["provider"].upstream_http
        made: list[tuple[str, str]] = []
        send = http.request

        def recording(method: str, url: str, **kwargs: Any) -> Any:
            made.append((method, url))
            return send(method, url, **kwargs)

        http.request = recording
        return made

    def state(self) -> dict[str, list[tuple]]:
        """Every row of the tables a refusal must not touch."""
        with self.engine.connect() as connection:
            return {table.name: sorted(tuple(row) for row in connection.execute(sa.select(table)))
                    for table in STATE_TABLES}

    def arrivals(self) -> dict[str, int]:
        return {name: len(fake.arrivals) for name, fake in self.upstreams.items()}

    def secrets(self) -> list[str]:
        return [s for fake in self.upstreams.values() for s in fake.secrets()]


def build_world(tmp_path_factory: pytest.TempPathFactory, vault_keys: Path,
                extra: dict[str, Any] | None = None) -> Iterator[World]:
    """A provider with its own keys and SQLite database, isolated from the developer's
    ``PROVIDER_*`` settings, in front of the spy upstreams; torn down afterwards."""
    fakes = {name: SpyUpstream(name).start() for name in ("drive", "drive2", "slow")}
    fakes["slow"].api_delay = SLOW_DELAY
    base = tmp_path_factory.mktemp("gateway-world")
    shutil.copytree(vault_keys, base / "keys" / "vault")
    overrides = {
        "issuer": ISSUER, "database_url": f"sqlite:///{base}/provider.db",
        "keys_dir": str(base / "keys"), "rate_limits": RATE_LIMITS_OFF,
        "gateway": {"max_body_bytes": MAX_BODY, "read_timeout": READ_TIMEOUT},
        "upstreams": {
            "drive": upstream_settings(fakes["drive"], FILE_ROUTES),
            "drive2": upstream_settings(fakes["drive2"], FILE_ROUTES[:1]),
            "slow": upstream_settings(fakes["slow"], FILE_ROUTES[:1]),
            "dead": upstream_settings(None, FILE_ROUTES[:1],
                                      base_url=f"http://127.0.0.1:{free_port()}/api"),
        },
        **(extra or {}),
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in list(os.environ):
                if name.startswith("PROVIDER_") and not name.startswith("PROVIDER_TEST_"):
                    patch.delenv(name)
            (base / "provider.toml").write_text("")
            patch.setenv("PROVIDER_CONFIG", str(base / "provider.toml"))
            initialize(config.load(overrides=overrides))
            app = create_app(overrides)
        app.config["TESTING"] = True
        oauth = OAuth(app, app.test_client())
        connect_grants = ("authorization_code", "refresh_token", EXCHANGE)
        world = World(
            app=app, overrides=overrides, keys_dir=base / "keys", upstreams=fakes,
            app_client=oauth.register("app", connect_grants, "files:read files:write",
                                      redirect_uris=["https://app.example/callback"],
                                      connections=True),
            cc_client=oauth.register("cc", ("client_credentials",), "files:read files:write"),
            cc_gateway=oauth.register("cc-gateway", ("client_credentials",), "files:read",
                                      audiences=[f"{GATEWAY}/drive"]),
            ip_bound=oauth.register("ip-bound", ("refresh_token", EXCHANGE),
                                    "files:read files:write", allowed_ips=["10.0.0.0/8"],
                                    connections=True),
        )
        yield world
        app.extensions["provider"].storage.engine.dispose()
    finally:
        for fake in fakes.values():
            fake.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, vault_keys: Path) -> Iterator[World]:
    yield from build_world(tmp_path_factory, vault_keys)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def forge(world: World, claims: dict[str, Any]) -> str:
    """A token signed as the provider (its own key from ``keys/signing``) with joserfc, an
    independent library: the signature is genuine, only the claims are the attacker's."""
    (pem,) = (world.keys_dir / "signing").glob("*.pem")
    header = {"alg": "ES256", "kid": pem.stem, "typ": "at+jwt"}
    return jose_jwt.encode(header, claims, ECKey.import_key(pem.read_bytes()), algorithms=["ES256"])


# Per-row context ------------------------------------------------------------------------------


class Ctx:
    """One row's subject, tokens (made on first use, before the row's request) and requests."""

    def __init__(self, world: World):
        self.world = world
        self.http = world.app.test_client()
        self.subject = unique("user")

    # Arranging --------------------------------------------------------------------------------

    def deposit(self, upstream: str = "drive", *, subject: str | None = None,
                client: Registered | None = None, remote: str = "127.0.0.1",
                refresh_token: str | None = None, **extra: Any) -> dict[str, Any]:
        fake = self.world.upstreams.get(upstream, self.world.upstreams["drive"])
        issued = fake.issue_tokens()
        self.upstream_tokens = issued
        response = self.http.post("/connections", json={
            "subject": subject or self.subject, "upstream": upstream,
            "access_token": issued["access_token"],
            "refresh_token": refresh_token or issued["refresh_token"], "expires_in": 3600,
            **extra}, headers=(client or self.world.app_client).basic,
            environ_base={"REMOTE_ADDR": remote})
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def exchanged(self, token: str, **params: Any) -> str:
        return self.world.oauth.exchanged(self.world.app_client, token, **params)

    @cached_property
    def wide(self) -> str:
        """files:read files:write, aud = the drive gateway resource."""
        return self.deposit()["access_token"]

    @cached_property
    def read_only(self) -> str:
        return self.exchanged(self.wide, scope="files:read")

    @cached_property
    def narrow(self) -> str:
        """files:read, narrowed to one file."""
        return self.exchanged(self.wide, scope="files:read", resource=f"{GATEWAY}/drive/files/abc")

    @cached_property
    def drive2(self) -> str:
        return self.deposit("drive2")["access_token"]

    @cached_property
    def slow(self) -> str:
        return self.deposit("slow")["access_token"]

    @cached_property
    def dead(self) -> str:
        return self.deposit("dead")["access_token"]

    @cached_property
    def client_credentials(self) -> str:
        return self.world.oauth.access_token(self.world.cc_client)

    @cached_property
    def cc_gateway_aud(self) -> str:
        """A client_credentials token whose aud *is* the drive gateway resource and whose scope
        covers the route; its sub (the client id) even has a connection to drive."""
        self.deposit(subject=self.world.cc_gateway.client_id)
        token = self.world.oauth.access_token(self.world.cc_gateway)
        assert claims_of(token)["aud"] in (f"{GATEWAY}/drive", [f"{GATEWAY}/drive"])
        return token

    @cached_property
    def expired(self) -> str:
        now = int(time.time())
        return forge(self.world, {**claims_of(self.wide), "iat": now - 4000, "exp": now - 3600})

    @cached_property
    def forged_control(self) -> str:
        """The same forgery with the genuine claims: proves a forged-claims refusal is about
        the claims, not the forging."""
        return forge(self.world, claims_of(self.wide))

    @cached_property
    def revoked(self) -> str:
        child = self.exchanged(self.wide, scope="files:read")
        assert self.world.oauth.revoke(self.world.app_client, child).status_code == 200
        return child

    @cached_property
    def replaced(self) -> str:
        """A token of a connection since replaced by a new deposit for the same pair."""
        subject = unique("replaced")
        old = self.deposit(subject=subject)["access_token"]
        self.old_child = self.exchanged(old, scope="files:read")
        assert self.http.get("/gateway/drive/files/abc",
                             headers={"Authorization": f"Bearer {old}"}).status_code == 200
        self.deposit(subject=subject)
        return old

    @cached_property
    def replaced_child(self) -> str:
        self.replaced  # noqa: B018 - arranges old_child
        return self.old_child

    @cached_property
    def deleted(self) -> str:
        deposited = self.deposit(subject=unique("deleted"))
        assert self.http.delete(f"/connections/{deposited['connection_id']}",
                                headers=self.world.app_client.basic).status_code == 204
        return deposited["access_token"]

    @cached_property
    def ip_bound(self) -> str:
        """A token of a client bound to 10.0.0.0/8, deposited from inside that range."""
        return self.deposit(client=self.world.ip_bound, remote="10.1.2.3")["access_token"]

    @cached_property
    def ip_connection(self) -> str:
        """A token of a connection bound to 10.0.0.0/8 (the client is not)."""
        return self.deposit(subject=unique("ipconn"), allowed_ips=["10.0.0.0/8"])["access_token"]

    @cached_property
    def unrefreshable(self) -> str:
        """A connection whose upstream access token the upstream no longer accepts and whose
        refresh token it never issued: the gateway's one refresh fails."""
        token = self.deposit(refresh_token="up-rt-" + secrets.token_urlsafe(24))["access_token"]
        self.world.upstreams["drive"].expire(self.upstream_tokens["access_token"])
        return token

    @cached_property
    def refresh_token(self) -> str:
        return self.deposit(subject=unique("rt"))["refresh_token"]

    @cached_property
    def upstream_access_token(self) -> str:
        return self.world.upstreams["drive"].issue_tokens()["access_token"]

    # Acting -----------------------------------------------------------------------------------

    def call(self, token: str | None, path: str = "/files/abc", method: str = "GET", *,
             upstream: str = "drive", headers: dict[str, str] | None = None,
             remote: str = "127.0.0.1", **kwargs: Any) -> Any:
        all_headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        all_headers.update(headers or {})
        return self.http.open(f"/gateway/{upstream}{path}", method=method, headers=all_headers,
                              environ_base={"REMOTE_ADDR": remote}, **kwargs)

    def chunked(self, token: str, body: bytes, path: str = "/echo") -> Any:
        """A chunked request body, as gunicorn hands it to the app (dechunked, terminated)."""
        return self.http.open(f"/gateway/drive{path}", method="POST", input_stream=BytesIO(body),
                              headers={"Authorization": f"Bearer {token}",
                                       "Transfer-Encoding": "chunked",
                                       "Content-Type": "application/octet-stream"},
                              environ_overrides={"wsgi.input_terminated": True})


# The table ------------------------------------------------------------------------------------

Check = Callable[[Ctx, Any, list[Recorded]], None]


@dataclass(frozen=True)
class Case:
    act: Callable[[Ctx], Any]
    status: int
    error: str | None
    uses: tuple[str, ...] = ()
    reaches: tuple[str, str, str] | None = None  # (upstream, method, raw path) when forwarded
    check: Check | None = None


def row(case_id: str, act: Callable[[Ctx], Any], status: int, error: str | None, *,
        uses: str = "", reaches: tuple[str, str, str] | None = None, check: Check | None = None,
        bug: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] if bug else []
    return pytest.param(Case(act, status, error, tuple(uses.split()), reaches, check),
                        id=case_id, marks=marks)


def reached(path: str, method: str = "GET", upstream: str = "drive") -> tuple[str, str, str]:
    return (upstream, method, "/api" + path)


def challenge_is(expected: str) -> Check:
    def check(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
        assert response.headers.get("WWW-Authenticate") == expected
    return check


def bare_challenge(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
    """RFC 6750 §3.1: no authentication information, so no error code in the challenge."""
    challenge = response.headers.get("WWW-Authenticate", "")
    assert challenge.startswith('Bearer realm="') and "error" not in challenge, challenge


INVALID_TOKEN = challenge_is('Bearer realm="token-provider", error="invalid_token"')


def needs_scope(scope: str | None) -> Check:
    expected = 'Bearer realm="token-provider", error="insufficient_scope"'
    return challenge_is(expected + (f', scope="{scope}"' if scope else ""))


def headers_absent(*names: str) -> Check:
    def check(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
        (request,) = forwarded
        present = {k.lower() for k in request.headers}
        assert not present & {n.lower() for n in names}, request.headers
        connection = (request.header("Connection") or "").lower()
        assert "x-secret" not in connection
    return check


def caller_credentials_stripped(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
    (request,) = forwarded
    upstream = ctx.world.upstreams["drive"]
    assert request.header("Authorization") == f"Bearer {ctx.upstream_tokens['access_token']}"
    assert request.header("Authorization").split()[1] in upstream.valid_access_tokens()
    assert request.header("Cookie") is None
    assert ctx.wide not in repr(request.headers) and "caller-session" not in repr(request.headers)


def upstream_challenges_dropped(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
    assert "Set-Cookie" not in response.headers
    assert "WWW-Authenticate" not in response.headers
    assert "Proxy-Authenticate" not in response.headers
    assert response.headers.get("X-Upstream") == "yes"  # other headers do come back


def method_not_overridden(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
    """The upstream sees the real method, and nothing that would let it pick another one."""
    (request,) = forwarded
    overrides = {"x-http-method-override", "x-method-override", "x-http-method"}
    assert not overrides & {k.lower() for k in request.headers}, request.headers


def echoes(body: bytes) -> Check:
    def check(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
        assert response.get_data() == body
        (request,) = forwarded
        assert request.body == body
    return check


def query_forwarded(ctx: Ctx, response: Any, forwarded: list[Recorded]) -> None:
    (request,) = forwarded
    assert request.query == "q=1&r=two"


FORWARDING = {"X-Forwarded-For": "10.1.2.3", "Forwarded": "for=10.1.2.3;proto=https",
              "X-Real-IP": "10.1.2.3", "X-Forwarded-Host": "evil.example",
              "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443",
              "X-Forwarded-Prefix": "/admin", "Via": "1.1 evil"}
HOP_BY_HOP = {"Connection": "X-Secret, Keep-Alive", "X-Secret": "1", "Keep-Alive": "timeout=5",
              "TE": "trailers", "Upgrade": "websocket", "Trailer": "X-Trailer",
              "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0"}
TABLE = [
    # No token, or not a Bearer token: 401 with a bare challenge (RFC 6750 §3.1).
    row("no-authorization-header", lambda c: c.call(None), 401, "invalid_request",
        check=bare_challenge),
    row("basic-instead-of-bearer", lambda c: c.call(None, headers={
        "Authorization": "Basic YXBwOnNlY3JldA=="}), 401, "invalid_request", check=bare_challenge),
    row("bearer-scheme-without-token", lambda c: c.call(None, headers={"Authorization": "Bearer "}),
        401, "invalid_request", check=bare_challenge),
    row("unbound-token-with-dpop-scheme",
        lambda c: c.call(None, headers={"Authorization": f"DPoP {c.wide}", "DPoP": "x.y.z"}),
        401, "invalid_token", uses="wide"),
    # Invalid or inactive tokens: 401 invalid_token.
    row("garbage-token", lambda c: c.call("not-a-token"), 401, "invalid_token", check=INVALID_TOKEN),
    row("two-tokens-in-one-header", lambda c: c.call(f"{c.wide}, Bearer {c.wide}"),
        401, "invalid_token", uses="wide", check=INVALID_TOKEN),
    row("token-in-query-string-only", lambda c: c.call(None, f"/files/abc?access_token={c.wide}"),
        401, "invalid_token", uses="wide"),
    row("token-in-query-string-with-valid-header",
        lambda c: c.call(c.wide, f"/files/abc?access_token={c.wide}"), 401, "invalid_token",
        uses="wide"),
    row("client-credentials-token-aud-not-gateway", lambda c: c.call(c.client_credentials),
        401, "invalid_token", uses="client_credentials", check=INVALID_TOKEN),
    row("client-credentials-token-aud-is-gateway-and-subject-has-connection",
        lambda c: c.call(c.cc_gateway_aud), 401, "invalid_token", uses="cc_gateway_aud",
        check=INVALID_TOKEN),
    row("drive2-token-at-drive", lambda c: c.call(c.drive2), 401, "invalid_token", uses="drive2",
        check=INVALID_TOKEN),
    row("drive-token-at-drive2", lambda c: c.call(c.wide, upstream="drive2"), 401, "invalid_token",
        uses="wide", check=INVALID_TOKEN),
    row("expired-token", lambda c: c.call(c.expired), 401, "invalid_token", uses="expired",
        check=INVALID_TOKEN),
    row("forged-with-genuine-claims-control", lambda c: c.call(c.forged_control), 200, None,
        uses="forged_control", reaches=reached("/files/abc")),
    row("revoked-token", lambda c: c.call(c.revoked), 401, "invalid_token", uses="revoked",
        check=INVALID_TOKEN),
    row("token-of-replaced-connection", lambda c: c.call(c.replaced), 401, "invalid_token",
        uses="replaced", check=INVALID_TOKEN),
    row("exchanged-token-of-replaced-connection", lambda c: c.call(c.replaced_child), 401,
        "invalid_token", uses="replaced_child", check=INVALID_TOKEN),
    row("token-of-deleted-connection", lambda c: c.call(c.deleted), 401, "invalid_token",
        uses="deleted", check=INVALID_TOKEN),
    row("refresh-token-as-bearer", lambda c: c.call(c.refresh_token), 401, "invalid_token",
        uses="refresh_token"),
    row("upstream-access-token-as-bearer", lambda c: c.call(c.upstream_access_token), 401,
        "invalid_token", uses="upstream_access_token"),
    # Unknown upstream, undeclared method or path: 404 not_found.
    row("unknown-upstream", lambda c: c.call(c.wide, upstream="nope"), 404, "not_found",
        uses="wide"),
    row("unknown-upstream-without-token", lambda c: c.call(None, upstream="nope"), 404, "not_found"),
    row("upstream-name-in-upper-case", lambda c: c.call(c.wide, upstream="DRIVE"), 404,
        "not_found", uses="wide"),
    row("undeclared-method-delete", lambda c: c.call(c.wide, method="DELETE"), 404, "not_found",
        uses="wide"),
    row("undeclared-method-post", lambda c: c.call(c.wide, method="POST", data=b"x"), 404,
        "not_found", uses="wide"),
    row("undeclared-method-head", lambda c: c.call(c.wide, method="HEAD"), 404, None, uses="wide"),
    row("undeclared-method-options", lambda c: c.call(c.wide, method="OPTIONS"), 404, "not_found",
        uses="wide"),
    row("undeclared-method-trace", lambda c: c.call(c.wide, method="TRACE"), 404, "not_found",
        uses="wide"),
    row("undeclared-path", lambda c: c.call(c.wide, "/admin/users"), 404, "not_found", uses="wide"),
    row("no-path", lambda c: c.call(c.wide, ""), 404, "not_found", uses="wide"),
    # Path tricks: refused as ambiguous, or forwarded exactly as authorised.
    row("dot-dot-segment", lambda c: c.call(c.wide, "/files/abc/../other"), 404, "not_found",
        uses="wide"),
    row("dot-segment", lambda c: c.call(c.wide, "/files/./abc"), 404, "not_found", uses="wide"),
    row("encoded-dot-dot", lambda c: c.call(c.wide, "/files/%2e%2e/other"), 404, "not_found",
        uses="wide"),
    row("encoded-dot-dot-as-id", lambda c: c.call(c.wide, "/files/%2E%2E"), 404, "not_found",
        uses="wide"),
    row("encoded-slash-upper", lambda c: c.call(c.wide, "/files/abc%2Fother"), 404, "not_found",
        uses="wide"),
    row("encoded-slash-lower", lambda c: c.call(c.wide, "/files/abc%2fother"), 404, "not_found",
        uses="wide"),
    row("encoded-backslash", lambda c: c.call(c.wide, "/files/ab%5Cc"), 404, "not_found",
        uses="wide"),
    row("encoded-nul", lambda c: c.call(c.wide, "/files/abc%00"), 404, "not_found", uses="wide"),
    row("leading-double-slash", lambda c: c.call(c.wide, "//files/abc"), 404, "not_found",
        uses="wide"),
    row("inner-double-slash", lambda c: c.call(c.wide, "/files//abc"), 404, "not_found",
        uses="wide"),
    row("trailing-slash", lambda c: c.call(c.wide, "/files/abc/"), 404, "not_found", uses="wide"),
    row("path-in-other-case", lambda c: c.call(c.wide, "/Files/abc"), 404, "not_found",
        uses="wide"),
    row("encoded-slash-after-upstream-name",
        lambda c: c.http.get("/gateway/drive%2Ffiles/abc",
                             headers={"Authorization": f"Bearer {c.wide}"}),
        404, "not_found", uses="wide"),
    row("encoded-upstream-name",
        lambda c: c.http.get("/gateway/%64rive/files/abc",
                             headers={"Authorization": f"Bearer {c.wide}"}),
        404, "not_found", uses="wide"),
    row("dot-dot-before-upstream-name",
        lambda c: c.http.get("/gateway/drive/../drive/files/abc",
                             headers={"Authorization": f"Bearer {c.wide}"}),
        404, "not_found", uses="wide"),
    row("matrix-parameter-is-part-of-the-id", lambda c: c.call(c.wide, "/files/abc;x=1"), 200, None,
        uses="wide", reaches=reached("/files/abc;x=1")),
    row("dot-dot-with-matrix-parameter", lambda c: c.call(c.wide, "/files/..;"), 404, "not_found",
        uses="wide"),
    row("query-forwarded-as-sent", lambda c: c.call(c.wide, "/files/abc?q=1&r=two"), 200, None,
        uses="wide", reaches=reached("/files/abc"), check=query_forwarded),
    # Scope and narrowed resource: 403 insufficient_scope.
    row("scope-missing-for-put", lambda c: c.call(c.read_only, method="PUT", data=b"x"), 403,
        "insufficient_scope", uses="read_only", check=needs_scope("files:write")),
    row("scope-missing-for-post", lambda c: c.call(c.read_only, "/echo", "POST", data=b"x"), 403,
        "insufficient_scope", uses="read_only", check=needs_scope("files:write")),
    row("narrowed-to-abc-calls-abcd", lambda c: c.call(c.narrow, "/files/abcd"), 403,
        "insufficient_scope", uses="narrow", check=needs_scope(None)),
    row("narrowed-to-abc-calls-ab", lambda c: c.call(c.narrow, "/files/ab"), 403,
        "insufficient_scope", uses="narrow"),
    row("narrowed-to-abc-calls-other", lambda c: c.call(c.narrow, "/files/other"), 403,
        "insufficient_scope", uses="narrow"),
    row("narrowed-to-abc-calls-ABC", lambda c: c.call(c.narrow, "/files/ABC"), 403,
        "insufficient_scope", uses="narrow"),
    row("narrowed-to-abc-calls-abc-with-matrix-parameter",
        lambda c: c.call(c.narrow, "/files/abc;x=1"), 403, "insufficient_scope", uses="narrow"),
    row("narrowed-to-abc-calls-percent-encoded-abc", lambda c: c.call(c.narrow, "/files/%61bc"),
        403, "insufficient_scope", uses="narrow"),
    # No route has three segments: refused as undeclared before the resource is compared.
    row("narrowed-to-abc-calls-abc-x", lambda c: c.call(c.narrow, "/files/abc/x"), 404,
        "not_found", uses="narrow"),
    row("narrowed-to-abc-escapes-with-encoded-dot-dot",
        lambda c: c.call(c.narrow, "/files/abc%2F..%2Fother"), 404, "not_found", uses="narrow"),
    row("narrowed-to-abc-calls-abc-control", lambda c: c.call(c.narrow), 200, None, uses="narrow",
        reaches=reached("/files/abc")),
    # Method changes never widen.
    row("read-only-put-with-override-to-get",
        lambda c: c.call(c.read_only, method="PUT", data=b"x",
                         headers={"X-HTTP-Method-Override": "GET", "X-Method-Override": "GET"}),
        403, "insufficient_scope", uses="read_only"),
    row("read-only-delete-with-override-to-get",
        lambda c: c.call(c.read_only, method="DELETE", headers={"X-HTTP-Method-Override": "GET"}),
        404, "not_found", uses="read_only"),
    row("x-http-method-override-not-forwarded",
        lambda c: c.call(c.read_only, headers={"X-HTTP-Method-Override": "DELETE"}), 200, None,
        uses="read_only", reaches=reached("/files/abc"), check=method_not_overridden),
    row("x-method-override-on-post-not-forwarded",
        lambda c: c.call(c.wide, "/echo", "POST", data=b"x",
                         headers={"X-Method-Override": "DELETE", "X-HTTP-Method": "DELETE"}),
        200, None, uses="wide", reaches=reached("/echo", "POST"), check=method_not_overridden),
    # Spoofed forwarding headers: never forwarded, never trusted for the caller's address.
    row("forwarding-headers-not-forwarded", lambda c: c.call(c.wide, headers=FORWARDING), 200, None,
        uses="wide", reaches=reached("/files/abc"), check=headers_absent(*FORWARDING)),
    row("ip-bound-client-spoofs-x-forwarded-for",
        lambda c: c.call(c.ip_bound, headers={"X-Forwarded-For": "10.1.2.3"}), 403,
        "access_denied", uses="ip_bound"),
    row("ip-bound-client-spoofs-forwarded-and-x-real-ip",
        lambda c: c.call(c.ip_bound, headers={"Forwarded": "for=10.1.2.3", "X-Real-IP": "10.1.2.3"}),
        403, "access_denied", uses="ip_bound"),
    row("ip-bound-client-from-inside-its-range-control",
        lambda c: c.call(c.ip_bound, remote="10.1.2.3"), 200, None, uses="ip_bound",
        reaches=reached("/files/abc")),
    row("ip-bound-connection-spoofs-x-forwarded-for",
        lambda c: c.call(c.ip_connection, headers={"X-Forwarded-For": "10.1.2.3"}), 403,
        "access_denied", uses="ip_connection"),
    # The caller's credentials never reach the upstream; the upstream's never reach the caller.
    row("caller-cookie-and-authorization-not-forwarded",
        lambda c: c.call(c.wide, headers={"Cookie": "session=caller-session"}), 200, None,
        uses="wide", reaches=reached("/files/abc"), check=caller_credentials_stripped),
    row("dpop-proof-not-forwarded", lambda c: c.call(c.wide, headers={"DPoP": "proof.jwt.value"}),
        200, None, uses="wide", reaches=reached("/files/abc"), check=headers_absent("DPoP")),
    row("hop-by-hop-headers-not-forwarded", lambda c: c.call(c.wide, headers=HOP_BY_HOP), 200, None,
        uses="wide", reaches=reached("/files/abc"), check=headers_absent(*HOP_BY_HOP)),
    row("upstream-cookies-and-challenges-not-returned", lambda c: c.call(c.wide, "/files/challenge"),
        200, None, uses="wide", reaches=reached("/files/challenge"),
        check=upstream_challenges_dropped),
    # Bodies over gateway.max_body_bytes: 413, not forwarded.
    row("body-over-limit-with-content-length",
        lambda c: c.call(c.wide, method="PUT", data=b"x" * (MAX_BODY + 1)), 413, "invalid_request",
        uses="wide"),
    row("body-far-over-limit-with-content-length",
        lambda c: c.call(c.wide, "/echo", "POST", data=b"x" * (64 * MAX_BODY)), 413,
        "invalid_request", uses="wide"),
    row("body-over-limit-chunked", lambda c: c.chunked(c.wide, b"x" * (4 * MAX_BODY)), 413,
        "invalid_request", uses="wide"),
    row("body-at-limit-control", lambda c: c.call(c.wide, "/echo", "POST", data=b"y" * MAX_BODY),
        200, None, uses="wide", reaches=reached("/echo", "POST"), check=echoes(b"y" * MAX_BODY)),
    row("chunked-body-under-limit-control", lambda c: c.chunked(c.wide, b"z" * 512), 200, None,
        uses="wide", reaches=reached("/echo", "POST"), check=echoes(b"z" * 512)),
    # Upstream failures: generic errors, no upstream secret in them.
    row("upstream-unreachable", lambda c: c.call(c.dead, upstream="dead"), 502, "bad_gateway",
        uses="dead"),
    row("upstream-slower-than-read-timeout", lambda c: c.call(c.slow, upstream="slow"), 504,
        "gateway_timeout", uses="slow", reaches=reached("/files/abc", upstream="slow")),
    row("upstream-refuses-credential-and-refresh-fails", lambda c: c.call(c.unrefreshable), 502,
        "bad_gateway", uses="unrefreshable", reaches=reached("/files/abc")),
]


@pytest.mark.parametrize("case", TABLE)
def test_gateway_answers_a_hostile_call_exactly_and_safely(world: World, case: Case) -> None:
    ctx = Ctx(world)
    for name in case.uses:
        getattr(ctx, name)
    state, arrivals, outbound = world.state(), world.arrivals(), len(world.outbound)
    recorded = {name: len(fake.requests) for name, fake in world.upstreams.items()}

    started = time.monotonic()
    response = case.act(ctx)
    data = response.get_data()
    elapsed = time.monotonic() - started

    body = response.get_json(silent=True) if response.mimetype == "application/json" else None
    assert (response.status_code, (body or {}).get("error")) == (case.status, case.error), data[:300]

    new = {name: fake.arrivals[arrivals[name]:] for name, fake in world.upstreams.items()}
    if case.reaches is None:
        # Only the closed port of "dead" may be tried: nothing listens there.
        dead = world.app.extensions["provider"].settings.upstreams["dead"].base_url
        tried = [url for _, url in world.outbound[outbound:] if not url.startswith(dead + "/")]
        assert tried == [], f"a refused call was sent towards an upstream: {tried}"
        assert not any(new.values()), f"a refused call reached an upstream: {new}"
        assert {n: len(f.requests) for n, f in world.upstreams.items()} == recorded
        assert world.state() == state, "a refused call changed the provider's state"
        forwarded: list[Recorded] = []
    else:
        name, method, path = case.reaches
        assert new == {n: [(method, path)] if n == name else [] for n in new}
        forwarded = world.upstreams[name].requests[recorded[name]:]
        assert [(r.method, r.path) for r in forwarded] == [(method, path)]

    # Nothing of the upstream's reaches the caller.
    exposed = data + repr(sorted(response.headers.items())).encode()
    for secret in world.secrets():
        assert secret.encode() not in exposed, "an upstream secret reached the caller"
    assert "Set-Cookie" not in response.headers
    challenge = response.headers.get("WWW-Authenticate")
    assert challenge is None or challenge.startswith('Bearer realm="token-provider"'), challenge
    if response.status_code >= 400 and response.request.method != "HEAD":
        assert body is not None and set(body) <= {"error", "error_description"}, data[:300]
        assert response.headers.get("Cache-Control") == "no-store"
        assert b"Traceback" not in data
    if case.error == "gateway_timeout":
        assert elapsed < READ_TIMEOUT + 2, "the read timeout was not applied"
    if case.check is not None:
        case.check(ctx, response, forwarded)


def test_gateway_timeouts_accept_fractional_seconds(tmp_path: Path) -> None:
    settings = config.load(str(tmp_path / "absent.toml"), environ={},
                           overrides={"gateway": {"read_timeout": 0.5, "connect_timeout": 0.5}})
    assert (settings.gateway.read_timeout, settings.gateway.connect_timeout) == (0.5, 0.5)
