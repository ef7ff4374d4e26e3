"""Hostile requests to the connect flow, its grants and the vault (CONTRACT.md "Vault and
gateway"; THREATS.md promises 5, 9 and 10).

- ``POST /connect/{upstream}``, ``GET /connect/{upstream}`` and its callback: every refusal is
  a plain JSON error, never a redirect, writes nothing and never calls an upstream; the
  failures that can be tied to a client (consent denied, upstream token endpoint failing)
  redirect to its registered URI with an error and its ``state``, and store nothing.
- ``authorization_code`` and ``refresh_token`` grants: codes and refresh tokens are bound to
  their client, single use, and reuse revokes what they issued, also under concurrent requests.
- ``POST /connections`` (deposit): refusals write nothing and never echo the credential.
- The vault: a tampered or moved ciphertext fails closed (502) with no plaintext anywhere.

State is read straight from the tables (``app.extensions["provider"].storage.engine``); calls
towards upstreams are recorded as the provider makes them. One provider and its spy upstreams
are shared by the module (see :func:`tests.test_attacks_gateway.build_world`); each test uses
subjects of its own.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import sqlalchemy as sa

from provider.connect import sha256_hex
from provider.refresh import token_hash
from provider.storage import schema
from provider.vault import VaultError
from tests.support import FORM, ISSUER, Registered, claims_of
from tests.test_attacks_gateway import GATEWAY, World, build_world, unique
from tests.upstream import pkce

REDIRECT = "https://app.example/callback"
# What a refusal must not write. ``connect_requests`` is left out only where a row says so.
STORED = (schema.connections, schema.refresh_tokens, schema.revocations,
          schema.authorization_codes)
ALL_STATE = (*STORED, schema.connect_requests)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, vault_keys: Path) -> Iterator[World]:
    yield from build_world(tmp_path_factory, vault_keys)


@pytest.fixture(scope="module")
def other_app(world: World) -> Registered:
    """A second connect client with the very same redirect URI as ``app``."""
    return world.oauth.register("other-app", ("authorization_code", "refresh_token"),
                                "files:read files:write", redirect_uris=[REDIRECT])


@pytest.fixture(autouse=True)
def _upstream_knobs_reset(world: World) -> Iterator[None]:
    yield
    for fake in world.upstreams.values():
        fake.deny_consent = fake.token_endpoint_fails = False


def table_state(world: World, tables: tuple[sa.Table, ...] = ALL_STATE) -> dict[str, list[tuple]]:
    with world.engine.connect() as connection:
        return {t.name: sorted(tuple(r) for r in connection.execute(sa.select(t))) for t in tables}


def update(world: World, table: sa.Table, where: Any, **values: Any) -> None:
    with world.engine.begin() as connection:
        assert connection.execute(sa.update(table).where(where).values(**values)).rowcount == 1


def local(url: str) -> str:
    """The path and query of one of the provider's URLs, for the test client."""
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == ISSUER, url
    return parts.path + ("?" + parts.query if parts.query else "")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def browser_get(url: str) -> str:
    """The browser at the upstream's authorization endpoint: where it is sent back to."""
    class Stop(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    try:
        urllib.request.build_opener(Stop).open(url, timeout=10)
    except urllib.error.HTTPError as redirect:
        assert redirect.code in (302, 303), redirect.code
        return redirect.headers["Location"]
    raise AssertionError("the upstream did not redirect")


def assert_plain_error(response: Any, status: int, error: str) -> None:
    """A JSON error, never a redirect (RFC 6749 §4.1.2.1), never cached."""
    assert (response.status_code, (response.get_json(silent=True) or {}).get("error")) == \
        (status, error), response.get_data()[:300]
    assert "Location" not in response.headers
    assert response.mimetype == "application/json"
    assert set(response.get_json()) <= {"error", "error_description"}
    assert response.headers.get("Cache-Control") == "no-store"


class Flow:
    """One user connecting drive through ``app``: every step of the flow, one at a time."""

    def __init__(self, world: World, client: Registered | None = None, upstream: str = "drive"):
        self.world = world
        self.http = world.app.test_client()
        self.client = client or world.app_client
        self.upstream = upstream
        self.subject = unique("user")
        self.verifier, self.challenge = pkce()
        self.state = "client-state-" + secrets.token_hex(4)

    def form(self, **overrides: Any) -> dict[str, str]:
        form = {"subject": self.subject, "redirect_uri": REDIRECT, "state": self.state,
                "code_challenge": self.challenge, "code_challenge_method": "S256",
                "scope": "files:read files:write"}
        form.update(overrides)
        return {k: v for k, v in form.items() if v is not None}

    def start(self, client: Registered | None = None, upstream: str | None = None,
              **overrides: Any) -> Any:
        return self.http.post(f"/connect/{upstream or self.upstream}", data=self.form(**overrides),
                              headers=(client or self.client).basic)

    def link(self) -> str:
        started = self.start()
        assert started.status_code == 201, started.get_json()
        return local(started.get_json()["authorization_url"])

    def open(self, link: str) -> Any:
        return self.http.get(link)

    def back_from_upstream(self) -> str:
        """The callback URL the upstream sends the browser to (path and query)."""
        opened = self.open(self.link())
        assert opened.status_code == 303, opened.get_json()
        return local(browser_get(opened.headers["Location"]))

    def callback(self, url: str) -> Any:
        return self.http.get(url)

    def code(self) -> str:
        answered = self.callback(self.back_from_upstream())
        assert answered.status_code == 303, answered.get_json()
        location = answered.headers["Location"]
        assert location.startswith(REDIRECT + "?")
        reply = query_of(location)
        assert reply["state"] == self.state and reply["iss"] == ISSUER
        return reply["code"]

    def redeem(self, code: str, client: Registered | None = None, **overrides: Any) -> Any:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                "code_verifier": self.verifier, **overrides}
        return self.http.post("/token", data={k: v for k, v in form.items() if v is not None},
                              headers=(client or self.client).basic)

    def tokens(self) -> dict[str, Any]:
        redeemed = self.redeem(self.code())
        assert redeemed.status_code == 200, redeemed.get_json()
        return redeemed.get_json()

    def refresh(self, refresh_token: str, client: Registered | None = None) -> Any:
        return self.http.post("/token", data={"grant_type": "refresh_token",
                                              "refresh_token": refresh_token},
                              headers=(client or self.client).basic)

    def call(self, token: str) -> Any:
        return self.http.get(f"/gateway/{self.upstream}/files/abc",
                             headers={"Authorization": f"Bearer {token}"})


# POST /connect/{upstream} -------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    act: Callable[[Flow], Any]
    status: int
    error: str


def start_row(case_id: str, act: Callable[[Flow], Any], status: int, error: str) -> Any:
    return pytest.param(Start(act, status, error), id=case_id)


START_TABLE = [
    start_row("client-without-authorization-code-grant",
              lambda f: f.start(client=f.world.cc_client), 400, "unauthorized_client"),
    start_row("unknown-upstream", lambda f: f.start(upstream="nope"), 404, "not_found"),
    start_row("no-client-authentication",
              lambda f: f.http.post("/connect/drive", data=f.form()), 401, "invalid_client"),
    start_row("wrong-client-secret",
              lambda f: f.start(client=Registered("app", "not-the-secret")), 401, "invalid_client"),
    start_row("unregistered-redirect-uri", lambda f: f.start(redirect_uri="https://evil.example/cb"),
              400, "invalid_request"),
    start_row("redirect-uri-dot-dot", lambda f: f.start(redirect_uri=REDIRECT + "/../evil"),
              400, "invalid_request"),
    start_row("redirect-uri-prefix-match", lambda f: f.start(redirect_uri=REDIRECT + "X"),
              400, "invalid_request"),
    start_row("redirect-uri-extra-query", lambda f: f.start(redirect_uri=REDIRECT + "?x=1"),
              400, "invalid_request"),
    start_row("redirect-uri-trailing-slash", lambda f: f.start(redirect_uri=REDIRECT + "/"),
              400, "invalid_request"),
    start_row("redirect-uri-fragment", lambda f: f.start(redirect_uri=REDIRECT + "#x"),
              400, "invalid_request"),
    start_row("redirect-uri-other-case",
              lambda f: f.start(redirect_uri="https://APP.example/callback"), 400, "invalid_request"),
    start_row("redirect-uri-http-downgrade",
              lambda f: f.start(redirect_uri="http://app.example/callback"), 400, "invalid_request"),
    start_row("redirect-uri-userinfo",
              lambda f: f.start(redirect_uri="https://app.example@evil.example/callback"),
              400, "invalid_request"),
    start_row("redirect-uri-missing", lambda f: f.start(redirect_uri=None), 400, "invalid_request"),
    start_row("code-challenge-method-plain",
              lambda f: f.start(code_challenge_method="plain", code_challenge=f.verifier),
              400, "invalid_request"),
    start_row("code-challenge-method-missing", lambda f: f.start(code_challenge_method=None),
              400, "invalid_request"),
    start_row("code-challenge-method-lower-case", lambda f: f.start(code_challenge_method="s256"),
              400, "invalid_request"),
    start_row("code-challenge-missing", lambda f: f.start(code_challenge=None), 400,
              "invalid_request"),
    start_row("code-challenge-too-short", lambda f: f.start(code_challenge="a" * 42), 400,
              "invalid_request"),
    start_row("code-challenge-too-long", lambda f: f.start(code_challenge="a" * 129), 400,
              "invalid_request"),
    start_row("code-challenge-bad-characters", lambda f: f.start(code_challenge="+/=" * 15),
              400, "invalid_request"),
    start_row("scope-outside-route-scopes", lambda f: f.start(scope="files:read files:admin"),
              400, "invalid_scope"),
    start_row("scope-of-another-upstream-style", lambda f: f.start(scope="files.read"),
              400, "invalid_scope"),
    start_row("subject-missing", lambda f: f.start(subject=None), 400, "invalid_request"),
    start_row("subject-with-space", lambda f: f.start(subject="alice bob"), 400, "invalid_request"),
    start_row("parameter-repeated",
              lambda f: f.http.post("/connect/drive", headers=f.client.basic, content_type=FORM,
                                    data=urlencode([*f.form().items(), ("redirect_uri", REDIRECT)])),
              400, "invalid_request"),
    start_row("json-instead-of-form",
              lambda f: f.http.post("/connect/drive", json=f.form(), headers=f.client.basic),
              400, "invalid_request"),
]


@pytest.mark.parametrize("case", START_TABLE)
def test_connect_start_refuses_without_redirect_or_state(world: World, case: Start) -> None:
    flow = Flow(world)
    before, outbound = table_state(world), len(world.outbound)
    response = case.act(flow)
    assert_plain_error(response, case.status, case.error)
    assert table_state(world) == before
    assert world.outbound[outbound:] == []


def test_connect_start_answers_a_single_use_link_for_a_good_request(world: World) -> None:
    """The control for the table above: the same request, unaltered, is accepted."""
    started = Flow(world).start()
    assert started.status_code == 201, started.get_json()
    assert set(started.get_json()) == {"authorization_url", "expires_in"}
    assert 0 < started.get_json()["expires_in"] <= 120


# GET /connect/{upstream}?request_uri= and the callback -----------------------------------------


def _expire_request(world: World) -> None:
    """Every open connect request expires now (the rows are this test's own or spent)."""
    with world.engine.begin() as connection:
        connection.execute(sa.update(schema.connect_requests)
                           .where(schema.connect_requests.c.completed_at.is_(None))
                           .values(expires_at=time.time() - 1))


def _opened_once(flow: Flow) -> str:
    link = flow.link()
    assert flow.open(link).status_code == 303
    return link


def _expired_link(flow: Flow) -> str:
    link = flow.link()
    _expire_request(flow.world)
    return link


def _without_urn_prefix(flow: Flow) -> str:
    """The genuine secret, without the ``urn:ietf:params:oauth:request_uri:`` prefix."""
    secret = query_of(flow.link())["request_uri"].removeprefix(REQUEST_URI)
    return "/connect/drive?" + urlencode({"request_uri": secret})


REQUEST_URI = "urn:ietf:params:oauth:request_uri:"
LINK_TABLE = [
    pytest.param(lambda f: "/connect/drive?" + urlencode({
        "request_uri": REQUEST_URI + secrets.token_urlsafe(32)}), 400, "invalid_request",
        id="unknown-request-uri"),
    pytest.param(lambda f: "/connect/drive", 400, "invalid_request", id="missing-request-uri"),
    pytest.param(_without_urn_prefix, 400, "invalid_request", id="request-uri-without-urn-prefix"),
    pytest.param(_opened_once, 400, "invalid_request", id="request-uri-used-twice"),
    pytest.param(_expired_link, 400, "invalid_request", id="request-uri-expired"),
    pytest.param(lambda f: f.link().replace("/connect/drive?", "/connect/nope?"), 404, "not_found",
                 id="unknown-upstream"),
    pytest.param(lambda f: f.link().replace("/connect/drive?", "/connect/drive2?"), 400,
                 "invalid_request", id="request-uri-opened-at-another-upstream"),
]


@pytest.mark.parametrize(("arrange", "status", "error"), LINK_TABLE)
def test_connect_link_refuses_without_redirect_or_state(world: World, arrange: Callable[[Flow], str],
                                                        status: int, error: str) -> None:
    flow = Flow(world)
    link = arrange(flow)
    before, outbound = table_state(world), len(world.outbound)
    assert_plain_error(flow.open(link), status, error)
    assert table_state(world) == before, "a refused link changed the provider's state"
    assert world.outbound[outbound:] == []


def _with_query(url: str, **params: str | None) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(params)
    return parts.path + "?" + urlencode({k: v for k, v in query.items() if v is not None})


def _replayed(flow: Flow) -> str:
    url = flow.back_from_upstream()
    assert flow.callback(url).status_code == 303
    return url


def _replayed_after_denial(flow: Flow) -> str:
    flow.world.upstreams["drive"].deny_consent = True
    url = flow.back_from_upstream()
    assert flow.callback(url).status_code == 303
    return url


def _expired_state(flow: Flow) -> str:
    url = flow.back_from_upstream()
    _expire_request(flow.world)
    return url


CALLBACK_TABLE = [
    pytest.param(lambda f: _with_query(f.back_from_upstream(), state=secrets.token_urlsafe(32)),
                 400, "invalid_request", id="forged-state"),
    pytest.param(lambda f: _with_query(f.back_from_upstream(), state=None), 400, "invalid_request",
                 id="missing-state"),
    pytest.param(lambda f: _with_query(f.back_from_upstream(), state=""), 400, "invalid_request",
                 id="empty-state"),
    pytest.param(lambda f: _with_query(f.back_from_upstream(), state=None, error="access_denied"),
                 400, "invalid_request", id="error-without-state"),
    pytest.param(_replayed, 400, "invalid_request", id="replayed-state"),
    pytest.param(_replayed_after_denial, 400, "invalid_request", id="replayed-state-after-denial"),
    pytest.param(_expired_state, 400, "invalid_request", id="expired-state"),
    pytest.param(lambda f: f.back_from_upstream().replace("/connect/drive/", "/connect/nope/"),
                 404, "not_found", id="unknown-upstream"),
    pytest.param(lambda f: f.back_from_upstream().replace("/connect/drive/", "/connect/drive2/"),
                 400, "invalid_request", id="state-of-another-upstream"),
]


@pytest.mark.parametrize(("arrange", "status", "error"), CALLBACK_TABLE)
def test_callback_refuses_without_redirect_or_state(world: World, arrange: Callable[[Flow], str],
                                                    status: int, error: str) -> None:
    flow = Flow(world)
    url = arrange(flow)
    world.upstreams["drive"].deny_consent = False
    before, outbound = table_state(world), len(world.outbound)
    assert_plain_error(flow.callback(url), status, error)
    assert table_state(world) == before, "a refused callback changed the provider's state"
    assert world.outbound[outbound:] == [], "a refused callback called the upstream"


@pytest.mark.parametrize(("knob", "error"), [
    pytest.param("deny_consent", "access_denied", id="consent-denied"),
    pytest.param("token_endpoint_fails", "temporarily_unavailable", id="upstream-token-endpoint-fails"),
    pytest.param("no_code", "invalid_request", id="upstream-returns-neither-code-nor-error"),
    pytest.param("wrong_code", "temporarily_unavailable", id="upstream-refuses-the-code"),
])
def test_callback_failure_redirects_to_the_client_and_stores_nothing(
        world: World, knob: str, error: str) -> None:
    flow = Flow(world)
    upstream = world.upstreams["drive"]
    if knob in ("deny_consent", "token_endpoint_fails"):
        setattr(upstream, knob, True)
    url = flow.back_from_upstream()
    if knob == "no_code":
        url = _with_query(url, code=None)
    elif knob == "wrong_code":
        url = _with_query(url, code=secrets.token_urlsafe(24))
    before = table_state(world, STORED)
    answered = flow.callback(url)
    assert answered.status_code == 303
    location = answered.headers["Location"]
    assert location.startswith(REDIRECT + "?"), location
    reply = query_of(location)
    assert reply["error"] == error and reply["state"] == flow.state and reply["iss"] == ISSUER
    assert "code" not in reply
    assert table_state(world, STORED) == before, "a failed connect stored something"
    for secret in world.secrets():
        assert secret not in location


# authorization_code grant -------------------------------------------------------------------


def _family_rows(world: World, subject: str) -> list[dict[str, Any]]:
    table = schema.refresh_tokens
    with world.engine.connect() as connection:
        return [dict(r) for r in connection.execute(
            sa.select(table).where(table.c.subject == subject)).mappings()]


@pytest.mark.parametrize(("attack", "status", "error"), [
    pytest.param(lambda f, code: f.redeem(code, code_verifier=pkce()[0]), 400, "invalid_grant",
                 id="wrong-code-verifier"),
    pytest.param(lambda f, code: f.redeem(code, code_verifier="short"), 400, "invalid_grant",
                 id="malformed-code-verifier"),
    pytest.param(lambda f, code: f.redeem(code, code_verifier=None), 400, "invalid_request",
                 id="missing-code-verifier"),
    pytest.param(lambda f, code: f.redeem(code, code_verifier=f.challenge), 400, "invalid_grant",
                 id="challenge-as-verifier"),
    pytest.param(lambda f, code: f.redeem(code, redirect_uri=REDIRECT + "X"), 400, "invalid_grant",
                 id="wrong-redirect-uri"),
    pytest.param(lambda f, code: f.redeem(code, redirect_uri=None), 400, "invalid_request",
                 id="missing-redirect-uri"),
    pytest.param(lambda f, code: f.redeem(code + "x"), 400, "invalid_grant", id="altered-code"),
    pytest.param(lambda f, code: f.redeem(secrets.token_urlsafe(32)), 400, "invalid_grant",
                 id="garbage-code"),
    pytest.param(lambda f, code: f.redeem(code, client=f.world.cc_client), 400,
                 "unauthorized_client", id="client-without-the-grant"),
])
def test_authorization_code_refusals_issue_nothing(world: World, attack: Callable, status: int,
                                                   error: str) -> None:
    flow = Flow(world)
    code = flow.code()
    refused = attack(flow, code)
    assert_plain_error(refused, status, error)
    assert _family_rows(world, flow.subject) == [], "a refused redemption issued a refresh token"


def test_code_is_spent_by_a_wrong_verifier(world: World) -> None:
    flow = Flow(world)
    code = flow.code()
    assert_plain_error(flow.redeem(code, code_verifier=pkce()[0]), 400, "invalid_grant")
    assert_plain_error(flow.redeem(code), 400, "invalid_grant")
    assert _family_rows(world, flow.subject) == []


def test_code_is_spent_by_a_wrong_redirect_uri(world: World) -> None:
    flow = Flow(world)
    code = flow.code()
    assert_plain_error(flow.redeem(code, redirect_uri=REDIRECT + "?x=1"), 400, "invalid_grant")
    assert_plain_error(flow.redeem(code), 400, "invalid_grant")


def test_code_of_another_client_is_refused_and_not_spent(world: World, other_app: Registered) -> None:
    flow = Flow(world)
    code = flow.code()
    before = table_state(world)
    assert_plain_error(flow.redeem(code, client=other_app), 400, "invalid_grant")
    assert table_state(world) == before, "another client's attempt changed the code"
    assert flow.redeem(code).status_code == 200, "the owner's code was spent by another client"


def test_expired_code_is_refused(world: World) -> None:
    flow = Flow(world)
    code = flow.code()
    update(world, schema.authorization_codes,
           schema.authorization_codes.c.code_hash == hashlib.sha256(code.encode()).hexdigest(),
           expires_at=time.time() - 1)
    assert_plain_error(flow.redeem(code), 400, "invalid_grant")
    assert _family_rows(world, flow.subject) == []


def test_replayed_code_revokes_every_token_it_issued(world: World) -> None:
    flow = Flow(world)
    code = flow.code()
    first = flow.redeem(code)
    assert first.status_code == 200
    tokens = first.get_json()
    narrow = world.oauth.exchanged(world.app_client, tokens["access_token"], scope="files:read")
    assert flow.call(tokens["access_token"]).status_code == 200
    assert_plain_error(flow.redeem(code), 400, "invalid_grant")
    for token in (tokens["access_token"], narrow):
        assert not world.oauth.active(token)
        assert flow.call(token).status_code == 401
    assert_plain_error(flow.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    assert all(row["revoked_at"] is not None for row in _family_rows(world, flow.subject))


# refresh_token grant ------------------------------------------------------------------------


@pytest.mark.parametrize("presented", [
    pytest.param(lambda f, t, other: f.refresh(t["refresh_token"], client=other),
                 id="another-clients-refresh-token"),
    pytest.param(lambda f, t, other: f.refresh(t["access_token"]), id="access-token-as-refresh-token"),
    pytest.param(lambda f, t, other: f.refresh(secrets.token_urlsafe(32)), id="garbage"),
    pytest.param(lambda f, t, other: f.refresh(t["refresh_token"] + "x"), id="altered"),
    pytest.param(lambda f, t, other: f.refresh(t["refresh_token"][:-1]), id="truncated"),
])
def test_refresh_token_refusals_change_nothing(world: World, other_app: Registered,
                                               presented: Callable) -> None:
    flow = Flow(world)
    tokens = flow.tokens()
    before = table_state(world)
    assert_plain_error(presented(flow, tokens, other_app), 400, "invalid_grant")
    assert table_state(world) == before
    # The owner's token is untouched: it still rotates, and its access token still works.
    assert flow.call(tokens["access_token"]).status_code == 200
    assert flow.refresh(tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize("end", ["deleted", "replaced"])
def test_refresh_token_of_an_ended_connection_is_refused(world: World, end: str) -> None:
    flow = Flow(world)
    tokens = flow.tokens()
    connection_id = claims_of(tokens["access_token"])["lineage"]["ids"][-1]
    if end == "deleted":
        assert flow.http.delete(f"/connections/{connection_id}",
                                headers=world.app_client.basic).status_code == 204
    else:
        again = Flow(world)
        again.subject = flow.subject  # a new connect for the same (subject, upstream)
        again.tokens()
    assert_plain_error(flow.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    assert flow.call(tokens["access_token"]).status_code == 401


@pytest.mark.parametrize("attempt", range(10))
def test_concurrent_reuse_of_a_refresh_token_revokes_the_family(world: World, attempt: int) -> None:
    flow = Flow(world)
    tokens = flow.tokens()
    barrier = threading.Barrier(2)
    answers: list[Any] = [None, None]

    def present(index: int) -> None:
        http = world.app.test_client()
        barrier.wait()
        answers[index] = http.post("/token", data={"grant_type": "refresh_token",
                                                   "refresh_token": tokens["refresh_token"]},
                                   headers=world.app_client.basic)

    threads = [threading.Thread(target=present, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(a.status_code for a in answers)
    assert statuses in ([200, 400], [400, 400]), [a.get_data()[:200] for a in answers]
    for answer in answers:
        if answer.status_code == 400:
            assert answer.get_json()["error"] == "invalid_grant"
    # The family is revoked: the first access token, and whatever the winner got.
    issued = [tokens["access_token"]] + [a.get_json()["access_token"] for a in answers
                                         if a.status_code == 200]
    for token in issued:
        assert not world.oauth.active(token)
        assert flow.call(token).status_code == 401
    for answer in answers:
        if answer.status_code == 200:
            assert_plain_error(flow.refresh(answer.get_json()["refresh_token"]), 400, "invalid_grant")


@pytest.mark.parametrize("race", ["refresh-token-reuse", "code-replay"])
def test_a_rotation_racing_a_reuse_leaves_no_live_refresh_token(
        world: World, race: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving the concurrent test above hits now and then, forced: the winner
    stores its new refresh token only once the loser has revoked the family."""
    flow = Flow(world)
    if race == "refresh-token-reuse":
        grant = {"grant_type": "refresh_token", "refresh_token": flow.tokens()["refresh_token"]}
    else:
        grant = {"grant_type": "authorization_code", "code": flow.code(), "redirect_uri": REDIRECT,
                 "code_verifier": flow.verifier}
    refresh_tokens = world.app.extensions["provider"].refresh_tokens
    revoked = threading.Event()
    add, revoke_family = refresh_tokens._add, refresh_tokens.revoke_family

    def add_after_the_revocation(family: Any) -> str:
        revoked.wait(5)
        return add(family)

    def revoke_and_tell(family_id: str, reason: str) -> None:
        revoke_family(family_id, reason)
        revoked.set()

    monkeypatch.setattr(refresh_tokens, "_add", add_after_the_revocation)
    monkeypatch.setattr(refresh_tokens, "revoke_family", revoke_and_tell)
    barrier, answers = threading.Barrier(2), []

    def present() -> None:
        http = world.app.test_client()
        barrier.wait()
        answers.append(http.post("/token", data=grant, headers=world.app_client.basic))

    threads = [threading.Thread(target=present) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    monkeypatch.undo()
    # The successor was stored after the family died: the winner is refused too (and its
    # refresh token is marked revoked in the table, not only in the revocation log).
    assert sorted(a.status_code for a in answers) == [400, 400]
    storage = world.app.extensions["provider"].storage
    if race == "refresh-token-reuse":
        family_id = storage.get_refresh_token(token_hash(grant["refresh_token"]))["family_id"]
    else:
        family_id = storage.get_authorization_code(sha256_hex(grant["code"]))["family_id"]
    table = schema.refresh_tokens
    with storage.engine.connect() as connection:
        rows = connection.execute(sa.select(table.c.revoked_at).where(
            table.c.family_id == family_id)).all()
    assert rows and all(row.revoked_at is not None for row in rows)


# POST /connections (deposit) ----------------------------------------------------------------

MARKER = "up-at-deposit-marker-" + secrets.token_hex(8)


def deposit_body(**overrides: Any) -> dict[str, Any]:
    body = {"subject": unique("dep"), "upstream": "drive", "access_token": MARKER,
            "refresh_token": MARKER + "-rt", "expires_in": 3600, "scope": "files:read"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@dataclass(frozen=True)
class Deposit:
    act: Callable[[Any, World], Any]
    status: int
    error: str


def deposit_row(case_id: str, act: Callable[[Any, World], Any], status: int, error: str) -> Any:
    return pytest.param(Deposit(act, status, error), id=case_id)


def _post(http: Any, world: World, body: Any = None, client: Registered | None = None,
          **kwargs: Any) -> Any:
    headers = (client or world.app_client).basic
    if body is None:
        body = deposit_body()
    return http.post("/connections", json=body, headers=headers, **kwargs)


DEPOSIT_TABLE = [
    deposit_row("client-without-connections-permission",
                lambda h, w: _post(h, w, client=w.cc_client), 403, "unauthorized_client"),
    deposit_row("unknown-upstream", lambda h, w: _post(h, w, deposit_body(upstream="nope")), 404,
                "not_found"),
    deposit_row("unknown-json-field", lambda h, w: _post(h, w, deposit_body(refresh_tokn="x")), 400,
                "invalid_request"),
    deposit_row("scope-outside-route-scopes",
                lambda h, w: _post(h, w, deposit_body(scope="files:read files:admin")), 400,
                "invalid_scope"),
    deposit_row("non-json-body",
                lambda h, w: h.post("/connections", data=urlencode(deposit_body()),
                                    content_type=FORM, headers=w.app_client.basic),
                400, "invalid_request"),
    deposit_row("json-with-wrong-content-type",
                lambda h, w: h.post("/connections", data=str(deposit_body()).replace("'", '"'),
                                    content_type="text/plain", headers=w.app_client.basic),
                400, "invalid_request"),
    deposit_row("malformed-json",
                lambda h, w: h.post("/connections", data='{"subject": ', content_type="application/json",
                                    headers=w.app_client.basic), 400, "invalid_request"),
    deposit_row("json-array", lambda h, w: _post(h, w, [deposit_body()]), 400, "invalid_request"),
    deposit_row("wrong-credentials",
                lambda h, w: _post(h, w, client=Registered("app", "not-the-secret")), 401,
                "invalid_client"),
    deposit_row("no-credentials",
                lambda h, w: h.post("/connections", json=deposit_body()), 401, "invalid_client"),
    deposit_row("missing-access-token", lambda h, w: _post(h, w, deposit_body(access_token=None)),
                400, "invalid_request"),
    deposit_row("access-token-not-a-string",
                lambda h, w: _post(h, w, deposit_body(access_token=["x"])), 400, "invalid_request"),
    deposit_row("expires-in-as-string", lambda h, w: _post(h, w, deposit_body(expires_in="3600")),
                400, "invalid_request"),
    deposit_row("expires-in-negative", lambda h, w: _post(h, w, deposit_body(expires_in=-1)),
                400, "invalid_request"),
    deposit_row("subject-with-space", lambda h, w: _post(h, w, deposit_body(subject="a b")),
                400, "invalid_request"),
    deposit_row("allowed-ips-not-cidr",
                lambda h, w: _post(h, w, deposit_body(allowed_ips=["not-an-ip"])), 400,
                "invalid_request"),
    deposit_row("credentials-of-another-client-in-body",
                lambda h, w: h.post("/connections", json={**deposit_body(), "client_id": "app",
                                                          "client_secret": "not-the-secret"}),
                401, "invalid_client"),
]


@pytest.mark.parametrize("case", DEPOSIT_TABLE)
def test_deposit_refusal_stores_nothing_and_echoes_no_credential(world: World, case: Deposit) -> None:
    http = world.app.test_client()
    before, outbound = table_state(world), len(world.outbound)
    response = case.act(http, world)
    assert_plain_error(response, case.status, case.error)
    assert MARKER.encode() not in response.get_data()
    assert table_state(world) == before
    assert world.outbound[outbound:] == []


# The vault: tampered and moved ciphertexts ---------------------------------------------------


def _deposit(world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    """A deposit of a live drive credential: (the upstream's tokens, the provider's answer)."""
    upstream_tokens = world.upstreams["drive"].issue_tokens()
    answer = world.app.test_client().post("/connections", headers=world.app_client.basic, json={
        "subject": unique("vault"), "upstream": "drive",
        "access_token": upstream_tokens["access_token"],
        "refresh_token": upstream_tokens["refresh_token"], "expires_in": 3600})
    assert answer.status_code == 201, answer.get_json()
    return upstream_tokens, answer.get_json()


def _ciphertext(world: World, connection_id: str) -> bytes:
    with world.engine.connect() as connection:
        return connection.execute(sa.select(schema.connections.c.ciphertext).where(
            schema.connections.c.connection_id == connection_id)).scalar_one()


def _set_ciphertext(world: World, connection_id: str, value: bytes) -> None:
    update(world, schema.connections, schema.connections.c.connection_id == connection_id,
           ciphertext=value)


def _assert_fails_closed(world: World, token: str, plaintexts: list[str]) -> None:
    drive = world.upstreams["drive"]
    seen, outbound = len(drive.requests), len(world.outbound)
    answer = world.app.test_client().get("/gateway/drive/files/abc",
                                         headers={"Authorization": f"Bearer {token}"})
    assert_plain_error(answer, 502, "bad_gateway")
    exposed = answer.get_data() + repr(sorted(answer.headers.items())).encode()
    for plaintext in plaintexts:
        assert plaintext.encode() not in exposed
    assert len(drive.requests) == seen and world.outbound[outbound:] == []


FLIPS = {  # offsets into the envelope: 0x01 | 2-byte length | wrapped key | nonce | ct | tag
    "version-byte": lambda n: 0,
    "wrapped-key-length": lambda n: 2,
    "wrapped-key": lambda n: 3 + 17,
    "nonce": lambda n: n - 16 - 40,
    "ciphertext": lambda n: n - 16 - 5,
    "gcm-tag": lambda n: n - 1,
}


@pytest.mark.parametrize("where", list(FLIPS))
def test_tampered_ciphertext_fails_closed_without_plaintext(world: World, where: str) -> None:
    upstream_tokens, deposited = _deposit(world)
    envelope = bytearray(_ciphertext(world, deposited["connection_id"]))
    envelope[FLIPS[where](len(envelope))] ^= 0x01
    _set_ciphertext(world, deposited["connection_id"], bytes(envelope))
    _assert_fails_closed(world, deposited["access_token"],
                         [upstream_tokens["access_token"], upstream_tokens["refresh_token"]])


@pytest.mark.parametrize("cut", [0, 1, 3, 100, -1])
def test_truncated_ciphertext_fails_closed_without_plaintext(world: World, cut: int) -> None:
    upstream_tokens, deposited = _deposit(world)
    envelope = _ciphertext(world, deposited["connection_id"])
    _set_ciphertext(world, deposited["connection_id"], envelope[:cut])
    _assert_fails_closed(world, deposited["access_token"], [upstream_tokens["access_token"]])


def test_ciphertext_moved_to_another_connection_fails_to_open(world: World) -> None:
    """The record id is associated data: a genuine envelope in another row does not open,
    so a database writer cannot make Bob's calls carry Alice's upstream token."""
    alice_upstream, alice = _deposit(world)
    bob_upstream, bob = _deposit(world)
    alice_envelope = _ciphertext(world, alice["connection_id"])
    vault = world.app.extensions["provider"].vault
    assert vault.open(alice["connection_id"], "drive", alice_envelope)  # genuine in its own row
    with pytest.raises(VaultError):
        vault.open(bob["connection_id"], "drive", alice_envelope)
    with pytest.raises(VaultError):
        vault.open(alice["connection_id"], "drive2", alice_envelope)
    _set_ciphertext(world, bob["connection_id"], alice_envelope)
    _assert_fails_closed(world, bob["access_token"],
                         [alice_upstream["access_token"], bob_upstream["access_token"]])
    # Alice's own connection is unaffected.
    ok = world.app.test_client().get("/gateway/drive/files/abc",
                                     headers={"Authorization": f"Bearer {alice['access_token']}"})
    assert ok.status_code == 200
    assert world.upstreams["drive"].requests[-1].header("Authorization") == \
        f"Bearer {alice_upstream['access_token']}"


def test_deposit_answer_is_for_the_gateway_resource(world: World) -> None:
    """The control for the vault tests: what a deposit answers, and that it works."""
    _, deposited = _deposit(world)
    assert claims_of(deposited["access_token"])["aud"] in (f"{GATEWAY}/drive", [f"{GATEWAY}/drive"])
    answer = world.app.test_client().get("/gateway/drive/files/abc",
                                         headers={"Authorization": f"Bearer {deposited['access_token']}"})
    assert answer.status_code == 200
