"""RFC 7009 revocation: client-bound, cascading, durable, and honoured by every instance."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from provider import create_app
from provider.storage import schema
from tests.conftest import BACKENDS, on_every_backend
from tests.support import ACCESS_TOKEN_TYPE, OAuth, claims_of

API = "https://api.example/v1"


def revocation_rows(app) -> int:
    with app.extensions["provider"].storage.engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(schema.revocations)).scalar()


@pytest.fixture
def svc(oauth):
    return oauth.register("svc", audiences=[API])


@on_every_backend
def test_revoking_a_token_revokes_every_token_derived_from_it(oauth, svc):
    root = oauth.access_token(svc)
    child = oauth.exchanged(svc, root, scope="read")
    grandchild = oauth.exchanged(svc, child, resource=f"{API}/files/1")
    sibling = oauth.access_token(svc)
    assert oauth.revoke(svc, child).status_code == 200
    assert oauth.active(root)
    assert not oauth.active(child)
    assert not oauth.active(grandchild)
    assert oauth.active(sibling)


def test_revocation_answers_200_with_no_store(oauth, svc):
    response = oauth.revoke(svc, oauth.access_token(svc))
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"


def test_revoking_unknown_or_invalid_token_is_200_and_writes_nothing(oauth, svc, app):
    before = revocation_rows(app)
    assert oauth.revoke(svc, "not-a-token").status_code == 200
    assert revocation_rows(app) == before


def test_revoking_twice_writes_one_row(oauth, svc, app):
    token = oauth.access_token(svc)
    before = revocation_rows(app)
    oauth.revoke(svc, token)
    oauth.revoke(svc, token)
    assert revocation_rows(app) == before + 1


def test_revoking_another_clients_token_is_refused_and_changes_nothing(oauth, svc, app):
    token = oauth.access_token(svc)
    other = oauth.register("other")
    before = revocation_rows(app)
    response = oauth.revoke(other, token)
    assert response.status_code == 400
    assert response.get_json()["error"] == "unauthorized_client"
    assert revocation_rows(app) == before
    assert oauth.active(token)


def test_client_with_revoke_any_revokes_any_token(oauth, svc):
    token = oauth.access_token(svc)
    admin = oauth.register("admin", revoke_any=True)
    assert oauth.revoke(admin, token).status_code == 200
    assert not oauth.active(token)


def test_client_may_revoke_token_it_obtained_by_exchange_of_anothers(oauth):
    caller = oauth.register("caller", audiences=["https://down.example"])
    down = oauth.register("https://down.example")
    exchanged = oauth.exchanged(down, oauth.access_token(caller))
    assert oauth.revoke(down, exchanged).status_code == 200
    assert not oauth.active(exchanged)


@on_every_backend
def test_revoking_a_subject_revokes_all_its_chains_with_one_row(oauth, svc, app):
    tokens = [oauth.access_token(svc) for _ in range(20)]
    children = [oauth.exchanged(svc, t) for t in tokens[:5]]
    bystander = oauth.access_token(oauth.register("bystander"))
    before = revocation_rows(app)
    app.extensions["provider"].revocations.revoke_subject("svc", "test")
    assert revocation_rows(app) == before + 1
    assert not any(oauth.active(t) for t in tokens + children)
    assert oauth.active(bystander)
    # Chains rooted after the revocation are not affected.
    time.sleep(0.002)
    assert oauth.active(oauth.access_token(svc))


@on_every_backend
def test_revoking_a_client_revokes_what_it_held_and_what_others_derived(oauth, app):
    caller = oauth.register("caller", audiences=["https://down.example"])
    down = oauth.register("https://down.example")
    held = oauth.access_token(caller)
    derived_by_other = oauth.exchanged(down, held)
    unrelated = oauth.access_token(down)
    app.extensions["provider"].revocations.revoke_client("caller", "test")
    assert not oauth.active(held)
    assert not oauth.active(derived_by_other)
    assert oauth.active(unrelated)
    time.sleep(0.002)
    assert oauth.active(oauth.access_token(caller))


def test_revoking_the_exchanging_client_spares_the_subject_it_exchanged(oauth, app):
    caller = oauth.register("caller", audiences=["https://down.example"])
    down = oauth.register("https://down.example")
    held = oauth.access_token(caller)
    derived = oauth.exchanged(down, held)
    app.extensions["provider"].revocations.revoke_client("https://down.example", "test")
    assert oauth.active(held)
    assert not oauth.active(derived)


@on_every_backend
def test_revocation_survives_a_restart(oauth, svc, app_config):
    root = oauth.access_token(svc)
    child = oauth.exchanged(svc, root)
    oauth.revoke(svc, root)
    restarted = create_app(app_config)
    try:
        again = OAuth(restarted, restarted.test_client())
        assert not again.active(root)
        assert not again.active(child)
    finally:
        restarted.extensions["provider"].storage.engine.dispose()


@on_every_backend
def test_revocation_on_one_instance_holds_on_another_within_a_second(oauth, svc, app_config):
    other_app = create_app(app_config)
    try:
        other = OAuth(other_app, other_app.test_client())
        root = oauth.access_token(svc)
        child = oauth.exchanged(svc, root)
        assert other.active(child)
        oauth.revoke(svc, root)
        time.sleep(1.0)
        assert not other.active(child)
        refused = other.exchange(svc, child)
        assert refused.status_code == 400
    finally:
        other_app.extensions["provider"].storage.engine.dispose()


def test_revoked_chain_cannot_be_extended(oauth, svc):
    root = oauth.access_token(svc)
    child = oauth.exchanged(svc, root)
    oauth.revoke(svc, root)
    response = oauth.exchange(svc, child)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "postgresql"], indirect=True)
def test_revocation_committed_out_of_id_order_is_still_seen(oauth, svc, app):
    """PostgreSQL assigns ids before commit: id 2 may be visible before id 1 commits."""
    provider = app.extensions["provider"]
    early, late = oauth.access_token(svc), oauth.access_token(svc)
    row = {"kind": "token", "revoked_at_ms": int(time.time() * 1000),
           "expires_at": int(time.time()) + 600, "reason": "test"}
    slow = provider.storage.engine.connect()
    slow_transaction = slow.begin()
    slow.execute(sa.insert(schema.revocations).values(value=claims_of(early)["jti"], **row))
    provider.storage.add_revocations([{**row, "value": claims_of(late)["jti"]}])
    provider.revocations.sync(force=True)
    assert not oauth.active(late)
    assert oauth.active(early)
    slow_transaction.commit()
    slow.close()
    provider.revocations.sync(force=True)
    assert not oauth.active(early)


def test_subject_token_type_does_not_change_the_revocation_check(oauth, svc):
    root = oauth.access_token(svc)
    oauth.revoke(svc, root)
    response = oauth.exchange(svc, root, subject_token_type=ACCESS_TOKEN_TYPE.replace(
        "access_token", "jwt"))
    assert response.status_code == 400
