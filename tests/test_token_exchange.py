"""RFC 8693 token exchange: narrowing only, delegation, entitlement, depth, revocation."""

from __future__ import annotations

import time

import pytest

from tests.support import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, claims_of, header_of

API = "https://api.example/v1"


@pytest.fixture
def svc(oauth):
    return oauth.register("svc", audiences=[API, "https://other.example"], token_ttl=600)


@pytest.fixture
def root(oauth, svc):
    return oauth.access_token(svc)


def test_exchange_answers_rfc8693_response(oauth, svc, root):
    response = oauth.exchange(svc, root, scope="read")
    body = response.get_json()
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in", "scope"}
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "read"
    assert header_of(body["access_token"])["typ"] == "at+jwt"


def test_exchange_without_scope_keeps_subject_scope(oauth, svc, root):
    child = claims_of(oauth.exchanged(svc, root))
    assert child["scope"] == claims_of(root)["scope"]
    assert child["sub"] == "svc"


def test_exchange_refuses_scope_not_in_subject_token(oauth, svc):
    narrow = oauth.access_token(svc, scope="read")
    response = oauth.exchange(svc, narrow, scope="read write")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_scope"


def test_exchange_issues_jwt_token_type_when_asked(oauth, svc, root):
    body = oauth.exchange(svc, root, requested_token_type=JWT_TOKEN_TYPE).get_json()
    assert body["issued_token_type"] == JWT_TOKEN_TYPE


def test_exchange_accepts_jwt_subject_token_type(oauth, svc, root):
    response = oauth.exchange(svc, root, subject_token_type=JWT_TOKEN_TYPE)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (f"{API}/files/abc", 200),
        (API, 200),
        ("HTTPS://API.EXAMPLE:443/v1/files", 200),
        ("https://api.example/v10", 400),
        ("https://api.example/v1/../admin", 400),
        ("https://api.example/v1/%2e%2e/admin", 400),
        ("https://api.example/v1/files%2Fabc", 400),
        ("https://api.example/v1//files", 400),
        ("https://api.example/v1?admin=1", 400),
        ("https://api.example/v1#frag", 400),
        ("https://api.example.evil/v1", 400),
        ("https://user@api.example/v1", 400),
        ("/v1/files", 400),
        ("https://api.example\\v1", 400),
    ],
    ids=["under", "equal", "normalised-case-and-port", "sibling-prefix", "dot-dot", "encoded-dots",
         "encoded-slash", "empty-segment", "query", "fragment", "other-host", "userinfo",
         "relative", "backslash"],
)
def test_exchange_narrows_resource_on_whole_segments(oauth, svc, root, resource, expected):
    response = oauth.exchange(svc, root, resource=resource)
    assert response.status_code == expected, response.get_json()
    if expected == 400:
        assert response.get_json()["error"] == "invalid_target"


def test_exchange_narrowed_token_cannot_be_widened_again(oauth, svc, root):
    narrow = oauth.exchanged(svc, root, resource=f"{API}/files/abc")
    assert claims_of(narrow)["aud"] == f"{API}/files/abc"
    response = oauth.exchange(svc, narrow, resource=f"{API}/files")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_target"


def test_exchange_audience_must_be_one_the_subject_carries(oauth, svc, root):
    ok = oauth.exchange(svc, root, audience="https://other.example")
    assert ok.status_code == 200
    assert claims_of(ok.get_json()["access_token"])["aud"] == "https://other.example"
    refused = oauth.exchange(svc, root, audience="https://evil.example")
    assert refused.status_code == 400
    assert refused.get_json()["error"] == "invalid_target"


def test_exchange_repeated_resource_and_audience_give_both(oauth, svc, root):
    response = oauth.post("/token", svc, [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", root), ("subject_token_type", ACCESS_TOKEN_TYPE),
        ("resource", f"{API}/a"), ("resource", f"{API}/b"), ("audience", "https://other.example"),
    ])
    assert response.status_code == 200, response.get_json()
    assert sorted(claims_of(response.get_json()["access_token"])["aud"]) == sorted(
        ["https://other.example", f"{API}/a", f"{API}/b"])


def test_exchange_never_outlives_subject_token(oauth):
    short = oauth.register("short", audiences=[API], token_ttl=60)
    long = oauth.register("https://long.example", audiences=[API], token_ttl=3600)
    subject = oauth.access_token(short)
    exchanged = oauth.post("/token", long, {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject, "subject_token_type": ACCESS_TOKEN_TYPE})
    # The long-lived client may exchange only tokens meant for it; make one that names it.
    assert exchanged.status_code == 400
    named = oauth.register("namer", audiences=["https://long.example"], token_ttl=60)
    subject = oauth.access_token(named)
    body = oauth.exchange(long, subject).get_json()
    assert claims_of(body["access_token"])["exp"] <= claims_of(subject)["exp"]
    assert body["expires_in"] <= 60


def test_exchange_chain_cannot_renew_forever(oauth, svc, root):
    token = root
    for _ in range(5):
        token = oauth.exchanged(svc, token)
        assert claims_of(token)["exp"] <= claims_of(root)["exp"]


def test_exchange_depth_is_bounded(oauth, svc, root):
    token = root
    for depth in range(1, 6):
        token = oauth.exchanged(svc, token)
        assert claims_of(token)["lineage"]["depth"] == depth
    sixth = oauth.exchange(svc, token)
    assert sixth.status_code == 400
    assert sixth.get_json()["error"] == "invalid_request"


@pytest.mark.parametrize("settings_overrides", [{"tokens": {"max_exchange_depth": 1}}])
def test_exchange_depth_follows_configuration(oauth, svc, root):
    once = oauth.exchanged(svc, root)
    assert oauth.exchange(svc, once).status_code == 400


def test_exchange_refuses_another_clients_token(oauth, svc, root):
    thief = oauth.register("thief")
    response = oauth.exchange(thief, root)
    assert response.status_code == 400
    assert response.get_json() == {"error": "invalid_request",
                                   "error_description": "subject_token is not acceptable"}


def test_exchange_accepts_token_whose_audience_names_the_client(oauth):
    caller = oauth.register("caller", audiences=["https://downstream.example/orders"])
    downstream = oauth.register("https://downstream.example/orders")
    token = oauth.access_token(caller)
    exchanged = claims_of(oauth.exchanged(downstream, token, scope="read"))
    assert exchanged["client_id"] == "https://downstream.example/orders"
    assert exchanged["sub"] == "caller"


def test_exchange_accepts_token_whose_may_act_names_the_client(oauth):
    user = oauth.register("user-agent", may_act="helper")
    helper = oauth.register("helper")
    token = oauth.access_token(user)
    assert claims_of(token)["may_act"] == {"sub": "helper"}
    assert oauth.exchange(helper, token).status_code == 200


def test_exchange_with_actor_token_names_actor_and_nests_prior_actors(oauth):
    user = oauth.register("user-agent", may_act="helper")
    helper = oauth.register("helper", may_act="second")
    second = oauth.register("second")
    subject = oauth.access_token(user)
    actor = oauth.access_token(helper)
    first = oauth.exchanged(helper, subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
    assert claims_of(first)["act"] == {"sub": "helper", "client_id": "helper"}
    assert claims_of(first)["sub"] == "user-agent"
    # The helper's token names "second" in may_act; "second" acts on the delegated token.
    second_actor = oauth.access_token(second)
    again = oauth.exchanged(second, first, actor_token=second_actor,
                            actor_token_type=ACCESS_TOKEN_TYPE)
    assert claims_of(again)["act"] == {"sub": "second", "client_id": "second",
                                       "act": {"sub": "helper", "client_id": "helper"}}
    assert claims_of(again)["sub"] == "user-agent"


def test_exchange_refuses_actor_that_may_act_does_not_name(oauth):
    user = oauth.register("user-agent", may_act="helper")
    intruder = oauth.register("intruder")
    subject = oauth.access_token(user)
    # The user's own client presents itself as actor, but may_act names only "helper".
    actor = oauth.access_token(user)
    response = oauth.exchange(user, subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
    assert response.status_code == 400
    assert response.get_json()["error_description"] == "actor_token is not acceptable"
    foreign_actor = oauth.access_token(intruder)
    response = oauth.exchange(user, subject, actor_token=foreign_actor,
                              actor_token_type=ACCESS_TOKEN_TYPE)
    assert response.status_code == 400


def test_exchange_refuses_revoked_subject_and_its_descendants(oauth, svc, root):
    child = oauth.exchanged(svc, root)
    grandchild = oauth.exchanged(svc, child)
    assert oauth.revoke(svc, root).status_code == 200
    for token in (root, child, grandchild):
        response = oauth.exchange(svc, token)
        assert response.status_code == 400
        assert response.get_json()["error_description"] == "subject_token is not acceptable"


def test_exchange_refuses_revoked_actor_token(oauth):
    user = oauth.register("user-agent", may_act="helper")
    helper = oauth.register("helper")
    subject, actor = oauth.access_token(user), oauth.access_token(helper)
    oauth.revoke(helper, actor)
    response = oauth.exchange(helper, subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
    assert response.status_code == 400


def test_revoking_actor_token_revokes_tokens_it_acted_for(oauth):
    user = oauth.register("user-agent", may_act="helper")
    helper = oauth.register("helper")
    subject, actor = oauth.access_token(user), oauth.access_token(helper)
    delegated = oauth.exchanged(helper, subject, actor_token=actor,
                                actor_token_type=ACCESS_TOKEN_TYPE)
    assert oauth.active(delegated)
    oauth.revoke(helper, actor)
    assert not oauth.active(delegated)


@pytest.mark.parametrize("settings_overrides", [{"tokens": {"leeway": 0}}])
def test_exchange_refuses_expired_subject_token(oauth):
    expiring = oauth.register("expiring", token_ttl=1)
    token = oauth.access_token(expiring)
    time.sleep(2.1)
    response = oauth.exchange(expiring, token)
    assert response.status_code == 400
    assert response.get_json()["error_description"] == "subject_token is not acceptable"


def test_exchange_refuses_refresh_token_type_for_access_token(oauth, svc, root):
    response = oauth.exchange(svc, root,
                              subject_token_type="urn:ietf:params:oauth:token-type:refresh_token")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_exchange_by_client_without_the_grant_is_unauthorized_client(oauth, root):
    plain = oauth.register("plain", grant_types=("client_credentials",))
    response = oauth.exchange(plain, root)
    assert response.status_code == 400
    assert response.get_json()["error"] == "unauthorized_client"
