"""Hostile requests to the token endpoint (RFC 6749 §3.2, §5.2; RFC 8693 §2; RFC 8707 §2).

Two tables: malformed or over-reaching token requests from an authenticated client, and failed
client authentication (RFC 6749 §2.3, §5.2: 401 ``invalid_client`` with ``WWW-Authenticate``).
Every row states the exact status and ``error``; every row also checks that the answer is safe
(no 5xx, JSON, ``no-store``, no stack trace or secret) and that nothing changed: no token
issued, no revocation row written, the client's existing token still active. The table shares
one provider per module (see ``attack_provider``); each test has clients of its own.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from urllib.parse import urlencode

import pytest
import redis

from provider import config, create_app
from provider.service import initialize
from tests.conftest import REDIS_URL
from tests.support import (
    ACCESS_TOKEN_TYPE,
    EXCHANGE,
    FORM,
    ISSUER,
    JWT_TOKEN_TYPE,
    REFRESH_TOKEN_TYPE,
    OAuth,
    Registered,
)
from tests.test_attacks_tokens import (
    assert_error,
    assert_safe_response,
    attack_provider,
    is_active,
    last_revocation,
    revocations_since,
    unique,
)

AUDIENCE = "https://api.example/v1"
MAX_REQUEST_BYTES = 65536


@dataclass
class Context:
    http: Any
    svc: Registered  # client_credentials + token exchange, client_secret_basic, audience /v1
    cc_only: Registered  # client_credentials only
    post_client: Registered  # client_secret_post
    ip_bound: Registered  # --allow-ip 10.0.0.0/8
    subject: str  # a token of svc with scope "read" for /v1
    foreign: str  # a token of cc_only: not svc's to exchange, nor to use as actor
    introspector: Registered
    last_revocation: int  # the newest revocation row before the test

    def post(self, body: bytes | str | dict[str, Any] | list[tuple[str, str]],
             auth: Registered | str | None = "svc", content_type: str | None = FORM,
             headers: dict[str, str] | None = None) -> Any:
        all_headers = dict(headers or {})
        if auth == "svc":
            auth = self.svc
        if isinstance(auth, Registered):
            all_headers.update(auth.basic)
        if isinstance(body, dict | list):
            body = urlencode(body)
        kwargs: dict[str, Any] = {"data": body, "headers": all_headers}
        if content_type is not None:
            kwargs["content_type"] = content_type
        return self.http.post("/token", **kwargs)

    def exchange(self, **params: Any) -> Any:
        return self.post({"grant_type": EXCHANGE, "subject_token": self.subject,
                          "subject_token_type": ACCESS_TOKEN_TYPE, **params})


def basic(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


CC = "grant_type=client_credentials"

Row = Callable[[Context], Any]


def row(case_id: str, request: Row, status: int, error: str, bug: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] if bug else []
    return pytest.param(request, status, error, id=case_id, marks=marks)


# RFC 8707 §2: resource is an absolute URI without fragment, under a registered audience.
REFUSED_RESOURCES = [
    ("not-absolute", "/v1/files"),
    ("scheme-relative", "//api.example/v1"),
    ("with-fragment", f"{AUDIENCE}/files#frag"),
    ("with-query", f"{AUDIENCE}/files?id=1"),
    ("with-dot-segment", f"{AUDIENCE}/./files"),
    ("with-dot-dot-segment", f"{AUDIENCE}/../admin"),
    ("with-encoded-dot-dot", f"{AUDIENCE}/%2e%2e/admin"),
    ("with-encoded-slash", f"{AUDIENCE}%2Ffiles"),
    ("with-backslash", f"{AUDIENCE}\\..\\admin"),
    ("with-userinfo", "https://attacker@api.example/v1"),
    ("with-empty-segment", f"{AUDIENCE}//files"),
    ("not-under-audience", "https://api.example/v2"),
    ("sibling-prefix", "https://api.example/v10"),
    ("other-host", "https://api.example.attacker.example/v1"),
    ("other-scheme", "ftp://api.example/v1"),
    ("other-port", "https://api.example:8443/v1"),
]


def _with_resource(value: str) -> Row:
    return lambda c: c.post({"grant_type": "client_credentials", "resource": value})


TOKEN_REQUESTS = [
    # RFC 6749 §3.2: the body is application/x-www-form-urlencoded.
    row("json-body", lambda c: c.post(json.dumps({"grant_type": "client_credentials"}),
                                      content_type="application/json"), 400, "invalid_request"),
    row("multipart-body", lambda c: c.http.post(
        "/token", headers=c.svc.basic, content_type="multipart/form-data",
        data={"grant_type": "client_credentials", "file": (BytesIO(b"x"), "x.txt")}),
        400, "invalid_request"),
    row("text-plain-body", lambda c: c.post(CC, content_type="text/plain"), 400, "invalid_request"),
    row("no-content-type", lambda c: c.post(CC, content_type=None), 400, "invalid_request"),
    row("form-with-json-payload", lambda c: c.post('{"grant_type":"client_credentials"}'),
        400, "invalid_request"),
    # RFC 6749 §3.1: parameters MUST NOT be included more than once.
    row("grant_type-twice", lambda c: c.post(f"{CC}&{CC}"), 400, "invalid_request"),
    row("grant_type-twice-different", lambda c: c.post(f"{CC}&grant_type={EXCHANGE}"),
        400, "invalid_request"),
    row("scope-twice", lambda c: c.post(f"{CC}&scope=read&scope=admin"), 400, "invalid_request"),
    row("subject_token-twice", lambda c: c.post([
        ("grant_type", EXCHANGE), ("subject_token", c.subject), ("subject_token", c.subject),
        ("subject_token_type", ACCESS_TOKEN_TYPE)]), 400, "invalid_request"),
    row("subject_token_type-twice", lambda c: c.post([
        ("grant_type", EXCHANGE), ("subject_token", c.subject),
        ("subject_token_type", ACCESS_TOKEN_TYPE), ("subject_token_type", JWT_TOKEN_TYPE)]),
        400, "invalid_request"),
    # RFC 6749 §5.2: grant_type missing, unknown, or not registered for the client.
    row("grant_type-missing", lambda c: c.post("scope=read"), 400, "invalid_request"),
    row("grant_type-empty", lambda c: c.post("grant_type=&scope=read"), 400, "invalid_request"),
    row("grant_type-unknown", lambda c: c.post("grant_type=password&username=a&password=b"),
        400, "unsupported_grant_type"),
    row("grant_type-case-changed", lambda c: c.post("grant_type=Client_Credentials"),
        400, "unsupported_grant_type"),
    row("semicolon-as-separator", lambda c: c.post("grant_type=client_credentials;scope=admin"),
        400, "unsupported_grant_type"),
    row("nul-in-grant_type", lambda c: c.post(f"{CC}%00"), 400, "unsupported_grant_type"),
    row("grant_type-not-registered-for-client", lambda c: c.post(
        {"grant_type": EXCHANGE, "subject_token": c.subject,
         "subject_token_type": ACCESS_TOKEN_TYPE}, auth=c.cc_only), 400, "unauthorized_client"),
    # The body is UTF-8 (RFC 6749 Appendix B), bounded in size and in fields.
    row("percent-encoded-non-utf8", lambda c: c.post(b"grant_type=client_credentials&scope=%ff"),
        400, "invalid_request"),
    row("raw-non-utf8-byte", lambda c: c.post(b"\xff"), 400, "invalid_request"),
    row("raw-non-utf8-in-name", lambda c: c.post(b"grant_type=client_credentials&\xfe\xff=1"),
        400, "invalid_request"),
    row("body-over-64KiB", lambda c: c.post(
        f"{CC}&scope=" + "a" * MAX_REQUEST_BYTES), 413, "invalid_request"),
    # Chunked (no Content-Length), as gunicorn hands it over: wsgi.input_terminated is set.
    # The body past the limit repeats grant_type, so even unbounded it could not succeed.
    row("chunked-body-over-64KiB", lambda c: c.http.post(
        "/token", input_stream=BytesIO(
            f"{CC}&pad={'a' * MAX_REQUEST_BYTES}&grant_type=password".encode()),
        content_type=FORM, headers={**c.svc.basic, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True}), 413, "invalid_request"),
    # A body cut short of its Content-Length (the client went away mid-body, or lied): the
    # part that came is never taken for the whole request.
    row("body-shorter-than-content-length", lambda c: c.http.post(
        "/token", input_stream=BytesIO(CC.encode()), content_type=FORM, headers=c.svc.basic,
        environ_overrides={"CONTENT_LENGTH": str(len(CC) + 40)}), 400, "invalid_request"),
    row("content-length-not-a-number", lambda c: c.http.post(
        "/token", input_stream=BytesIO(CC.encode()), content_type=FORM, headers=c.svc.basic,
        environ_overrides={"CONTENT_LENGTH": "twenty"}), 400, "invalid_request"),
    row("too-many-fields", lambda c: c.post(
        CC + "".join(f"&x{i}=1" for i in range(100))), 400, "invalid_request"),
    # RFC 6749 §3.3: scope within what is registered, and well-formed.
    row("scope-beyond-registered", lambda c: c.post(f"{CC}&scope=read+superuser"),
        400, "invalid_scope"),
    row("scope-with-quote", lambda c: c.post({"grant_type": "client_credentials",
                                              "scope": 'read"'}), 400, "invalid_scope"),
    row("scope-with-backslash", lambda c: c.post({"grant_type": "client_credentials",
                                                  "scope": "read\\"}), 400, "invalid_scope"),
    row("scope-double-space", lambda c: c.post({"grant_type": "client_credentials",
                                                "scope": "read  write"}), 400, "invalid_scope"),
    row("scope-with-tab", lambda c: c.post({"grant_type": "client_credentials",
                                            "scope": "read\twrite"}), 400, "invalid_scope"),
    row("scope-non-ascii", lambda c: c.post({"grant_type": "client_credentials",
                                             "scope": "réad"}), 400, "invalid_scope"),
    row("scope-prefix-of-registered", lambda c: c.post(f"{CC}&scope=rea"), 400, "invalid_scope"),
    *[row(f"resource-{name}", _with_resource(value), 400, "invalid_target")
      for name, value in REFUSED_RESOURCES],
    row("too-many-resources", lambda c: c.post(
        [("grant_type", "client_credentials")] + [("resource", f"{AUDIENCE}/{i}") for i in range(33)]),
        400, "invalid_request"),
    row("audience-not-registered", lambda c: c.post(
        {"grant_type": "client_credentials", "audience": "https://attacker.example"}),
        400, "invalid_target"),
    row("audience-prefix-of-registered", lambda c: c.post(
        {"grant_type": "client_credentials", "audience": "https://api.example/v"}),
        400, "invalid_target"),
    # RFC 8693 §2.1: required and paired parameters, supported types.
    row("exchange-subject_token-missing", lambda c: c.post(
        {"grant_type": EXCHANGE, "subject_token_type": ACCESS_TOKEN_TYPE}), 400, "invalid_request"),
    row("exchange-subject_token_type-missing", lambda c: c.post(
        {"grant_type": EXCHANGE, "subject_token": c.subject}), 400, "invalid_request"),
    row("exchange-subject_token_type-id_token", lambda c: c.exchange(
        subject_token_type="urn:ietf:params:oauth:token-type:id_token"), 400, "invalid_request"),
    row("exchange-subject_token_type-saml2", lambda c: c.exchange(
        subject_token_type="urn:ietf:params:oauth:token-type:saml2"), 400, "invalid_request"),
    row("exchange-subject_token_type-unknown", lambda c: c.exchange(
        subject_token_type="Bearer"), 400, "invalid_request"),
    row("exchange-access-token-as-refresh-token", lambda c: c.exchange(
        subject_token_type=REFRESH_TOKEN_TYPE), 400, "invalid_request"),
    row("exchange-actor_token-without-type", lambda c: c.exchange(actor_token=c.subject),
        400, "invalid_request"),
    row("exchange-actor_token_type-without-token", lambda c: c.exchange(
        actor_token_type=ACCESS_TOKEN_TYPE), 400, "invalid_request"),
    row("exchange-actor_token_type-unsupported", lambda c: c.exchange(
        actor_token=c.subject, actor_token_type=REFRESH_TOKEN_TYPE), 400, "invalid_request"),
    row("exchange-requested_token_type-refresh_token", lambda c: c.exchange(
        requested_token_type=REFRESH_TOKEN_TYPE), 400, "invalid_request"),
    row("exchange-requested_token_type-id_token", lambda c: c.exchange(
        requested_token_type="urn:ietf:params:oauth:token-type:id_token"), 400, "invalid_request"),
    row("exchange-scope-beyond-subject", lambda c: c.exchange(scope="read write"),
        400, "invalid_scope"),
    row("exchange-scope-registered-but-not-in-subject", lambda c: c.exchange(scope="admin"),
        400, "invalid_scope"),
    row("exchange-resource-sibling-prefix", lambda c: c.exchange(
        resource="https://api.example/v10"), 400, "invalid_target"),
    row("exchange-resource-dot-dot-escape", lambda c: c.exchange(
        resource=f"{AUDIENCE}/files/../../v2"), 400, "invalid_target"),
    row("exchange-audience-not-in-subject", lambda c: c.exchange(
        audience="https://api.example/v2"), 400, "invalid_target"),
    row("exchange-foreign-subject-token", lambda c: c.exchange(subject_token=c.foreign),
        400, "invalid_request"),
    row("exchange-foreign-actor-token", lambda c: c.exchange(
        actor_token=c.foreign, actor_token_type=ACCESS_TOKEN_TYPE), 400, "invalid_request"),
    row("exchange-actor_token-garbage", lambda c: c.exchange(
        actor_token="garbage", actor_token_type=ACCESS_TOKEN_TYPE), 400, "invalid_request"),
]


CLIENT_AUTHENTICATION = [
    # RFC 6749 §5.2: invalid_client, 401, with WWW-Authenticate, whichever method was tried.
    row("no-credentials", lambda c: c.post(CC, auth=None), 401, "invalid_client"),
    row("client_secret-empty-in-body", lambda c: c.post(
        {"grant_type": "client_credentials", "client_id": c.post_client.client_id,
         "client_secret": ""}, auth=None), 401, "invalid_client"),
    row("client_id-only-in-body", lambda c: c.post(f"{CC}&client_id={c.svc.client_id}", auth=None),
        401, "invalid_client"),
    row("wrong-secret", lambda c: c.post(
        CC, auth=Registered(c.svc.client_id, "wrong-" + (c.svc.secret or ""))), 401, "invalid_client"),
    row("empty-secret", lambda c: c.post(
        CC, auth=None, headers=basic(f"{c.svc.client_id}:".encode())), 401, "invalid_client"),
    row("secret-of-another-client", lambda c: c.post(
        CC, auth=Registered(c.svc.client_id, c.cc_only.secret)), 401, "invalid_client"),
    row("unknown-client", lambda c: c.post(CC, auth=Registered("nobody", c.svc.secret)),
        401, "invalid_client"),
    row("client-id-too-long", lambda c: c.post(CC, auth=Registered("x" * 300, "secret")),
        401, "invalid_client"),
    row("client-id-with-space", lambda c: c.post(CC, auth=Registered("svc svc", "secret")),
        401, "invalid_client"),
    row("basic-and-body-client_id-differ", lambda c: c.post(
        f"{CC}&client_id={c.cc_only.client_id}"), 401, "invalid_client"),
    row("malformed-basic-bad-base64", lambda c: c.post(
        CC, auth=None, headers={"Authorization": "Basic !!!not*base64!!!"}), 401, "invalid_client"),
    row("malformed-basic-no-colon", lambda c: c.post(
        CC, auth=None, headers=basic(c.svc.client_id.encode())), 401, "invalid_client"),
    row("malformed-basic-non-utf8", lambda c: c.post(
        CC, auth=None, headers=basic(b"\xff\xfe:\xff")), 401, "invalid_client"),
    row("malformed-basic-percent-encoded-non-utf8", lambda c: c.post(
        CC, auth=None, headers=basic(f"{c.svc.client_id}:%ff".encode())), 401, "invalid_client"),
    row("malformed-basic-empty", lambda c: c.post(
        CC, auth=None, headers={"Authorization": "Basic "}), 401, "invalid_client"),
    row("malformed-basic-bad-percent-encoding", lambda c: c.post(
        CC, auth=None, headers=basic(b"%ZZsvc:%")), 401, "invalid_client"),
    row("bearer-instead-of-basic", lambda c: c.post(
        CC, auth=None, headers={"Authorization": f"Bearer {c.subject}"}), 401, "invalid_client"),
    row("digest-scheme", lambda c: c.post(
        CC, auth=None, headers={"Authorization": 'Digest username="svc"'}), 401, "invalid_client"),
    row("secret_basic-client-using-secret_post", lambda c: c.post(
        {"grant_type": "client_credentials", "client_id": c.svc.client_id,
         "client_secret": c.svc.secret}, auth=None), 401, "invalid_client"),
    row("secret_post-client-using-secret_basic", lambda c: c.post(CC, auth=c.post_client),
        401, "invalid_client"),
    row("ip-bound-client-from-other-address", lambda c: c.post(CC, auth=c.ip_bound),
        401, "invalid_client"),
    row("ip-bound-client-spoofing-x-forwarded-for", lambda c: c.post(
        CC, auth=c.ip_bound, headers={"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3"}),
        401, "invalid_client"),
    # RFC 6749 §2.3: a client MUST NOT use more than one authentication method per request.
    row("two-methods-basic-and-client_secret-in-body", lambda c: c.post(
        {"grant_type": "client_credentials", "client_id": c.svc.client_id,
         "client_secret": c.svc.secret}), 400, "invalid_request"),
    row("two-methods-basic-and-client_assertion", lambda c: c.post(
        {"grant_type": "client_credentials", "client_assertion": "a.b.c",
         "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}),
        400, "invalid_request"),
]


@pytest.fixture(scope="module")
def _attack_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    yield from attack_provider(tmp_path_factory)


@pytest.fixture
def app(_attack_provider: tuple[Any, dict[str, Any]]) -> Any:
    return _attack_provider[0]


@pytest.fixture
def ctx(oauth: Any, client: Any, app: Any) -> Context:
    svc = oauth.register(unique("svc"), audiences=[AUDIENCE])
    cc_only = oauth.register(unique("cc-only"), ("client_credentials",), "read",
                             audiences=[AUDIENCE])
    return Context(
        http=client,
        svc=svc,
        cc_only=cc_only,
        post_client=oauth.register(unique("post-client"), ("client_credentials",), "read",
                                   auth_method="client_secret_post"),
        ip_bound=oauth.register(unique("ip-bound"), ("client_credentials",), "read",
                                allowed_ips=["10.0.0.0/8"]),
        subject=oauth.access_token(svc, scope="read"),
        foreign=oauth.access_token(cc_only),
        introspector=oauth.register(unique("introspector"), ("client_credentials",), "introspect",
                                    introspect=True),
        last_revocation=last_revocation(app),
    )


def assert_nothing_changed(oauth: Any, ctx: Context) -> None:
    assert revocations_since(oauth.app, ctx.last_revocation) == 0
    assert is_active(oauth, ctx.introspector, ctx.subject)
    assert is_active(oauth, ctx.introspector, ctx.foreign)


def secrets_of(ctx: Context) -> tuple[str, ...]:
    clients = (ctx.svc, ctx.cc_only, ctx.post_client, ctx.ip_bound)
    return (*(r.secret or "" for r in clients), ctx.subject, ctx.foreign)


def test_controls_every_context_client_can_get_a_token(ctx):
    """The rows below fail for their hostile part only: each client works when used right."""
    assert ctx.post(CC).status_code == 200
    assert ctx.post(CC, auth=ctx.cc_only).status_code == 200
    assert ctx.post({"grant_type": "client_credentials", "client_id": ctx.post_client.client_id,
                     "client_secret": ctx.post_client.secret}, auth=None).status_code == 200
    assert ctx.exchange(resource=f"{AUDIENCE}/files/1").status_code == 200
    assert ctx.http.post("/token", data={"grant_type": "client_credentials"},
                         headers=ctx.ip_bound.basic,
                         environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 200


@pytest.mark.parametrize(("request_", "status", "error"), TOKEN_REQUESTS)
def test_token_endpoint_refuses_hostile_request(oauth, ctx, request_, status, error):
    response = request_(ctx)
    assert_safe_response(response, secrets=secrets_of(ctx))
    assert_error(response, status, error)
    assert "access_token" not in response.get_json()
    assert_nothing_changed(oauth, ctx)


@pytest.mark.parametrize(("request_", "status", "error"), CLIENT_AUTHENTICATION)
def test_token_endpoint_refuses_failed_client_authentication(oauth, ctx, request_, status, error):
    response = request_(ctx)
    assert_safe_response(response, secrets=secrets_of(ctx))
    assert_error(response, status, error)
    if status == 401:
        assert response.headers["WWW-Authenticate"].lower().startswith("basic")
    assert "access_token" not in response.get_json()
    assert_nothing_changed(oauth, ctx)


def _comparable(response: Any) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = sorted((k.lower(), v) for k, v in response.headers.items()
                     if k.lower() not in ("x-request-id", "date"))
    return response.status_code, response.get_data(), headers


@pytest.mark.parametrize("auth_shape", ["basic", "client_secret_post"])
def test_failure_looks_the_same_for_unknown_client_and_wrong_secret(ctx, auth_shape):
    """THREATS.md promise 8: failures must not tell whether a client exists."""
    def attempt(client_id: str, secret: str) -> Any:
        if auth_shape == "basic":
            return ctx.post(CC, auth=Registered(client_id, secret))
        return ctx.post({"grant_type": "client_credentials", "client_id": client_id,
                         "client_secret": secret}, auth=None)

    wrong_secret = attempt(ctx.svc.client_id, "x" * 43)
    unknown = attempt("no-such-client", "x" * 43)
    assert wrong_secret.status_code == 401
    assert _comparable(unknown) == _comparable(wrong_secret)
    assert ctx.svc.client_id not in wrong_secret.get_data(as_text=True)
    assert "no-such-client" not in unknown.get_data(as_text=True)


def own_provider(storage: str, tmp_path, vault_keys, rate_limits: dict[str, str]):
    """A provider of its own, so that the shared one's counters see nothing of this test's;
    its limits in memory, or in Redis (one round trip checks address and client at once)."""
    shutil.copytree(vault_keys, tmp_path / "keys" / "vault")
    overrides = {"issuer": ISSUER, "database_url": f"sqlite:///{tmp_path}/own.db",
                 "keys_dir": str(tmp_path / "keys"), "rate_limits": rate_limits}
    if storage == "redis":
        redis.Redis.from_url(REDIS_URL).flushdb()  # same issuer as other tests: same keys
        overrides["redis_url"] = REDIS_URL
    initialize(config.load(overrides=overrides))
    application = create_app(overrides)
    yield application
    application.extensions["provider"].audit.close()
    application.extensions["provider"].storage.engine.dispose()


@pytest.fixture(params=["memory"] + (["redis"] if REDIS_URL else []))
def flood_app(request, tmp_path, vault_keys):
    yield from own_provider(request.param, tmp_path, vault_keys, {"failed_client_auth": "3/minute"})


def test_a_flood_of_failed_logins_closes_the_address_even_to_the_right_secret(flood_app):
    flood = OAuth(flood_app, flood_app.test_client())
    victim = flood.register("victim")
    wrong = Registered("victim", "not-the-secret")
    for _ in range(3):
        assert flood.token(wrong).status_code == 401
    for attempt in (wrong, victim):  # the right secret too: the address is closed for now
        refused = flood.token(attempt)
        assert refused.status_code == 429
        assert refused.get_json()["error"] == "temporarily_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
    other = flood_app.test_client()
    elsewhere = other.post("/token", data={"grant_type": "client_credentials"},
                           headers=victim.basic, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert elsewhere.status_code == 200


def test_a_closed_address_is_refused_without_its_credentials_being_looked_at(flood_app,
                                                                              monkeypatch):
    """Once this process has seen the address closed, right and wrong secrets are refused alike
    and before any work that depends on them: no timing tells a guesser which guess was right."""
    flood = OAuth(flood_app, flood_app.test_client())
    victim = flood.register("victim")
    wrong = Registered("victim", "not-the-secret")
    for _ in range(3):
        assert flood.token(wrong).status_code == 401
    assert flood.token(wrong).status_code == 429  # the failure that crosses the limit

    def looked_at(*args, **kwargs):
        raise AssertionError("the credentials of a closed address were looked at")

    monkeypatch.setattr("provider.views.authenticate", looked_at)
    for attempt in (wrong, victim, wrong):
        assert flood.token(attempt).status_code == 429


# -- a client over its own limit ------------------------------------------------------------
# With Redis, /token and /introspect send the count and read the verdict later, after the work
# that has no effect (parsing, verifying the subject token): these show that the answer is the
# same as if the verdict came first, and that no verdict is ever left for another request.


@pytest.fixture(params=["memory"] + (["redis"] if REDIS_URL else []))
def limited_app(request, tmp_path, vault_keys):
    """Each client may call /token and /introspect 3 times a minute."""
    yield from own_provider(request.param, tmp_path, vault_keys,
                            {"token": "3/minute", "introspect": "3/minute"})


def issued_events(app) -> list[dict[str, Any]]:
    provider = app.extensions["provider"]
    provider.audit.flush()
    return [e for e in provider.storage.audit_events() if e["type"] == "token.issued"]


def test_a_client_over_its_token_limit_gets_429_whatever_else_is_wrong(limited_app, caplog):
    oauth = OAuth(limited_app, limited_app.test_client())
    client = oauth.register("limited")
    subject = oauth.access_token(client)
    assert oauth.exchange(client, "not-a-token").status_code == 400  # counted, not issued
    assert oauth.exchange(client, subject, scope="read").status_code == 200
    for over in (
        lambda: oauth.exchange(client, "not-a-token"),  # invalid_request under the limit
        lambda: oauth.token(client, scope="root"),  # invalid_scope under the limit
        lambda: oauth.token(client, grant_type="password"),  # unsupported_grant_type
        lambda: oauth.exchange(client, subject, scope="read"),
        lambda: oauth.token(client),
    ):
        response = over()
        assert response.status_code == 429, response.get_json()
        assert response.get_json()["error"] == "temporarily_unavailable"
        assert int(response.headers["Retry-After"]) >= 1
    assert len(issued_events(limited_app)) == 2  # nothing issued past the limit
    other = oauth.register("other")
    assert oauth.token(other).status_code == 200  # one client's limit is its own
    assert "never read" not in caplog.text


def test_an_introspector_over_its_limit_gets_429_whatever_else_is_wrong(limited_app, caplog):
    oauth = OAuth(limited_app, limited_app.test_client())
    subject = oauth.access_token(oauth.register("holder"))
    for _ in range(3):
        assert oauth.active(subject)
    introspector = oauth._introspector
    for token in ("garbage", subject, ""):
        response = oauth.post("/introspect", introspector, {"token": token})
        assert response.status_code == 429, response.get_json()
    nosy = oauth.register("nosy", ("client_credentials",))  # may not introspect: 403 ...
    for _ in range(3):
        assert oauth.post("/introspect", nosy, {"token": subject}).status_code == 403
    assert oauth.post("/introspect", nosy, {"token": subject}).status_code == 429  # ... until
    assert "never read" not in caplog.text


def test_each_request_reads_its_own_verdict(limited_app, caplog):
    """A verdict left unread by a failing request would be read by the next one in its place,
    shifting every answer after it by one: the limit's fourth call would be let through."""
    oauth = OAuth(limited_app, limited_app.test_client())
    client = oauth.register("limited")
    assert oauth.exchange(client, "not-a-token").status_code == 400
    assert oauth.token(client, scope="root").status_code == 400
    assert oauth.token(client).status_code == 200
    assert oauth.token(client).status_code == 429
    assert "never read" not in caplog.text
