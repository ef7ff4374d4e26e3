"""Hostile requests to introspection (RFC 7662) and revocation (RFC 7009).

``/introspect``: only authenticated clients created with ``--introspect`` may call it (RFC 7662
§2.1, §4); anything not currently valid is exactly ``{"active": false}``, with nothing that
says why (THREATS.md promise 6). ``/revoke``: a client revokes only its own tokens; another's
is ``unauthorized_client`` and changes nothing; unknown or invalid tokens are 200 (RFC 7009
§2.2); a wrong ``token_type_hint`` does not stop a revocation (§2.1: the server may ignore it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import Registered, claims_of
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


@dataclass
class Context:
    http: Any
    rs: Registered  # --introspect
    svc: Registered  # owns `token`
    other: Registered  # another client, no special rights
    token: str  # an active token of svc
    oauth: Any
    last_revocation: int  # the newest revocation row before the test

    def active(self, token: str) -> bool:
        return is_active(self.oauth, self.rs, token)

    def new_revocations(self) -> int:
        return revocations_since(self.oauth.app, self.last_revocation)

    def post(self, path: str, body: dict[str, Any] | str | bytes, auth: Registered | None,
             content_type: str | None = None, headers: dict[str, str] | None = None) -> Any:
        all_headers = dict(headers or {})
        if auth is not None:
            all_headers.update(auth.basic)
        kwargs: dict[str, Any] = {"data": body, "headers": all_headers}
        if content_type is not None:
            kwargs["content_type"] = content_type
        return self.http.post(path, **kwargs)


@pytest.fixture(scope="module")
def _attack_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    yield from attack_provider(tmp_path_factory)


@pytest.fixture
def app(_attack_provider: tuple[Any, dict[str, Any]]) -> Any:
    return _attack_provider[0]


@pytest.fixture
def ctx(oauth: Any, client: Any, app: Any) -> Context:
    svc = oauth.register(unique("svc"), audiences=[AUDIENCE])
    return Context(
        http=client,
        rs=oauth.register(unique("rs"), ("client_credentials",), "introspect", introspect=True),
        svc=svc,
        other=oauth.register(unique("other"), audiences=[AUDIENCE]),
        token=oauth.access_token(svc),
        oauth=oauth,
        last_revocation=last_revocation(app),
    )


def secrets_of(ctx: Context) -> tuple[str, ...]:
    return (ctx.rs.secret or "", ctx.svc.secret or "", ctx.other.secret or "")


Row = Callable[[Context], Any]


def row(case_id: str, request: Row, status: int, error: str) -> Any:
    return pytest.param(request, status, error, id=case_id)


# /introspect ---------------------------------------------------------------------------------

INTROSPECTION_REFUSALS = [
    row("caller-without-introspect-right", lambda c: c.post(
        "/introspect", {"token": c.token}, c.svc), 403, "unauthorized_client"),
    row("caller-introspecting-its-own-token-without-right", lambda c: c.post(
        "/introspect", {"token": c.token, "token_type_hint": "access_token"}, c.svc),
        403, "unauthorized_client"),
    row("unauthenticated", lambda c: c.post("/introspect", {"token": c.token}, None),
        401, "invalid_client"),
    row("wrong-secret", lambda c: c.post(
        "/introspect", {"token": c.token}, Registered(c.rs.client_id, "not-the-secret")),
        401, "invalid_client"),
    row("unknown-client", lambda c: c.post("/introspect", {"token": c.token},
                                           Registered("ghost", "secret")), 401, "invalid_client"),
    row("token-as-bearer-credential", lambda c: c.post(
        "/introspect", {"token": c.token}, None, headers={"Authorization": f"Bearer {c.token}"}),
        401, "invalid_client"),
    row("missing-token", lambda c: c.post("/introspect", {}, c.rs), 400, "invalid_request"),
    row("empty-token", lambda c: c.post("/introspect", {"token": ""}, c.rs), 400, "invalid_request"),
    row("token-twice", lambda c: c.post("/introspect", f"token={c.token}&token=x", c.rs,
                                        content_type="application/x-www-form-urlencoded"),
        400, "invalid_request"),
    row("json-body", lambda c: c.post("/introspect", json.dumps({"token": c.token}), c.rs,
                                      content_type="application/json"), 400, "invalid_request"),
    row("non-utf8-body", lambda c: c.post("/introspect", b"token=%ff", c.rs,
                                          content_type="application/x-www-form-urlencoded"),
        400, "invalid_request"),
    row("two-client-authentication-methods", lambda c: c.post(
        "/introspect", {"token": c.token, "client_id": c.rs.client_id,
                        "client_secret": c.rs.secret}, c.rs),
        400, "invalid_request"),
]


@pytest.mark.parametrize(("request_", "status", "error"), INTROSPECTION_REFUSALS)
def test_introspection_refuses_hostile_request(oauth, ctx, request_, status, error):
    response = request_(ctx)
    assert_safe_response(response, secrets=(*secrets_of(ctx), ctx.token))
    assert_error(response, status, error)
    assert "active" not in response.get_json()
    assert ctx.new_revocations() == 0
    assert ctx.active(ctx.token)


def test_introspection_answers_get_with_json_405(ctx):
    response = ctx.http.get("/introspect", headers=ctx.rs.basic)
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == "invalid_request"


Inactive = Callable[[Any, Context], str]


def _revoked(oauth: Any, c: Context) -> str:
    assert oauth.revoke(c.svc, c.token).status_code == 200
    return c.token


def _child_of_revoked(oauth: Any, c: Context) -> str:
    child = oauth.exchanged(c.svc, c.token, scope="read")
    assert oauth.revoke(c.svc, c.token).status_code == 200
    return child


def _grandchild_of_revoked(oauth: Any, c: Context) -> str:
    child = oauth.exchanged(c.svc, c.token, scope="read", resource=f"{AUDIENCE}/files")
    grandchild = oauth.exchanged(c.svc, child, resource=f"{AUDIENCE}/files/1")
    assert oauth.revoke(c.svc, c.token).status_code == 200
    return grandchild


INACTIVE_TOKENS: list[Any] = [
    pytest.param(_revoked, id="revoked"),
    pytest.param(_child_of_revoked, id="child-of-revoked"),
    pytest.param(_grandchild_of_revoked, id="grandchild-of-revoked"),
    pytest.param(lambda oauth, c: "garbage", id="garbage"),
    pytest.param(lambda oauth, c: "x" * 4096, id="long-garbage"),
    pytest.param(lambda oauth, c: c.token[:-5], id="truncated"),
    pytest.param(lambda oauth, c: c.rs.secret or "", id="a-client-secret"),
    pytest.param(lambda oauth, c: "rt_" + "A" * 43, id="refresh-token-shaped"),
]


@pytest.mark.parametrize("make", INACTIVE_TOKENS)
@pytest.mark.parametrize("hint", [None, "access_token", "refresh_token", "bogus"])
def test_introspection_of_inactive_token_is_exactly_active_false(oauth, ctx, make, hint):
    token = make(oauth, ctx)
    before = last_revocation(oauth.app)
    data = {"token": token, **({"token_type_hint": hint} if hint else {})}
    response = ctx.post("/introspect", data, ctx.rs)
    assert_safe_response(response, secrets=secrets_of(ctx))
    assert response.status_code == 200
    assert response.get_json() == {"active": False}
    assert revocations_since(oauth.app, before) == 0


def test_introspection_of_active_token_says_only_what_the_contract_lists(oauth, ctx):
    """The control for the table above: the same caller does see an active token."""
    response = ctx.post("/introspect", {"token": ctx.token, "token_type_hint": "bogus"}, ctx.rs)
    assert_safe_response(response, secrets=secrets_of(ctx))
    body = response.get_json()
    assert body["active"] is True and body["jti"] == claims_of(ctx.token)["jti"]
    assert set(body) <= {"active", "scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti",
                         "token_type", "act", "cnf"}


# /revoke -------------------------------------------------------------------------------------

REVOCATION_REFUSALS = [
    row("missing-token", lambda c: c.post("/revoke", {}, c.svc), 400, "invalid_request"),
    row("empty-token", lambda c: c.post("/revoke", {"token": ""}, c.svc), 400, "invalid_request"),
    row("token-twice", lambda c: c.post("/revoke", f"token={c.token}&token={c.token}", c.svc,
                                        content_type="application/x-www-form-urlencoded"),
        400, "invalid_request"),
    row("json-body", lambda c: c.post("/revoke", json.dumps({"token": c.token}), c.svc,
                                      content_type="application/json"), 400, "invalid_request"),
    row("unauthenticated", lambda c: c.post("/revoke", {"token": c.token}, None),
        401, "invalid_client"),
    row("wrong-secret", lambda c: c.post(
        "/revoke", {"token": c.token}, Registered(c.svc.client_id, "not-the-secret")),
        401, "invalid_client"),
    row("unknown-client", lambda c: c.post("/revoke", {"token": c.token},
                                           Registered("ghost", "secret")), 401, "invalid_client"),
    row("token-as-bearer-credential", lambda c: c.post(
        "/revoke", {"token": c.token}, None, headers={"Authorization": f"Bearer {c.token}"}),
        401, "invalid_client"),
    row("another-clients-token", lambda c: c.post("/revoke", {"token": c.token}, c.other),
        400, "unauthorized_client"),
    row("another-clients-token-with-hint", lambda c: c.post(
        "/revoke", {"token": c.token, "token_type_hint": "access_token"}, c.other),
        400, "unauthorized_client"),
    row("another-clients-token-by-introspector", lambda c: c.post(
        "/revoke", {"token": c.token}, c.rs), 400, "unauthorized_client"),
    row("two-client-authentication-methods", lambda c: c.post(
        "/revoke", {"token": c.token, "client_id": c.svc.client_id,
                    "client_secret": c.svc.secret}, c.svc),
        400, "invalid_request"),
]


@pytest.mark.parametrize(("request_", "status", "error"), REVOCATION_REFUSALS)
def test_revocation_refuses_hostile_request_and_changes_nothing(oauth, ctx, request_, status, error):
    response = request_(ctx)
    assert_safe_response(response, secrets=(*secrets_of(ctx), ctx.token))
    assert_error(response, status, error)
    assert ctx.new_revocations() == 0
    assert ctx.active(ctx.token)


def test_revocation_answers_get_with_json_405(oauth, ctx):
    response = ctx.http.get(f"/revoke?token={ctx.token}", headers=ctx.svc.basic)
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert ctx.new_revocations() == 0
    assert ctx.active(ctx.token)


@pytest.mark.parametrize("token", [
    pytest.param("garbage", id="garbage"),
    pytest.param("x" * 4096, id="long-garbage"),
    pytest.param("a.b.c", id="three-segments"),
    pytest.param("rt_" + "A" * 43, id="refresh-token-shaped"),
    pytest.param("ünïcødé", id="non-ascii"),
])
@pytest.mark.parametrize("hint", [None, "access_token", "refresh_token", "bogus"])
def test_revocation_of_unknown_token_is_200_and_writes_nothing(oauth, ctx, token, hint):
    data = {"token": token, **({"token_type_hint": hint} if hint else {})}
    response = ctx.post("/revoke", data, ctx.svc)
    assert_safe_response(response, secrets=secrets_of(ctx))
    assert response.status_code == 200
    assert ctx.new_revocations() == 0
    assert ctx.active(ctx.token)


@pytest.mark.parametrize("hint", [
    pytest.param("refresh_token", id="wrong-hint"),
    pytest.param("id_token", id="unknown-hint"),
    pytest.param("bogus value with spaces", id="nonsense-hint"),
    pytest.param("ACCESS_TOKEN", id="hint-case-changed"),
])
def test_revocation_with_wrong_hint_still_revokes_own_token(oauth, ctx, hint):
    """RFC 7009 §2.1: the hint may be ignored; an unsupported hint must not save the token."""
    response = ctx.post("/revoke", {"token": ctx.token, "token_type_hint": hint}, ctx.svc)
    assert_safe_response(response, secrets=(*secrets_of(ctx), ctx.token))
    assert response.status_code == 200
    assert ctx.new_revocations() == 1
    assert not ctx.active(ctx.token)


def test_revoking_an_already_revoked_token_is_200_and_writes_nothing_more(oauth, ctx):
    assert ctx.post("/revoke", {"token": ctx.token}, ctx.svc).status_code == 200
    assert ctx.new_revocations() == 1
    again = ctx.post("/revoke", {"token": ctx.token}, ctx.svc)
    assert_safe_response(again, secrets=secrets_of(ctx))
    assert again.status_code == 200
    assert ctx.new_revocations() == 1


def test_revoke_any_client_may_revoke_another_clients_token(oauth, ctx):
    """The control for another-clients-token: the refusal is about rights, not the token."""
    admin = oauth.register(unique("admin"), ("client_credentials",), "read", revoke_any=True)
    response = ctx.post("/revoke", {"token": ctx.token}, admin)
    assert response.status_code == 200
    assert ctx.new_revocations() == 1
    assert not ctx.active(ctx.token)
