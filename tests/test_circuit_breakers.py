"""The gateway's circuit breaker, end to end: a token family calling past the suspension
threshold is revoked with a reason, every token of the family stops working (the ones exchanged
from it too), and the suspension is alerted once: one ``alert`` audit event, one webhook call,
one count in ``provider_suspensions_total``, however many requests (or instances) see the
threshold crossed before the revocation reaches them."""

from __future__ import annotations

from typing import Any

import pytest

from provider import create_app
from tests.conftest import REDIS_URL, on_every_backend
from tests.servers import Webhook

GATEWAY = "http://localhost/gateway/drive"
REASON = "suspended: gateway calls over the limit"
STORES = ["database"] + (["redis"] if REDIS_URL else [])


@pytest.fixture
def settings_overrides(upstream, webhook: Webhook) -> dict[str, Any]:
    return {
        "upstreams": {"drive": {"base_url": upstream.base_url, "routes": [
            {"method": "GET", "path": "/files/{id}", "scope": "files:read"}]}},
        # The family's own limit, 3 a minute, answers 429; the 6th call crosses the threshold.
        "rate_limits": {"gateway": "3/minute", "suspend": {"gateway": "5/minute"}},
        "alerts": {"webhook_url": webhook.url},
    }


@pytest.fixture
def caller(oauth):
    return oauth.register("backend", scope="files:read", audiences=[GATEWAY], connections=True)


def deposit(oauth, client, upstream, subject: str = "alice") -> dict[str, Any]:
    response = oauth.http.post("/connections", json={
        "subject": subject, "upstream": "drive",
        "access_token": upstream.issue_tokens()["access_token"], "scope": "files:read"},
        headers=client.basic)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def call(oauth, token: str):
    return oauth.http.get("/gateway/drive/files/abc", headers={"Authorization": f"Bearer {token}"})


def alerts(provider, webhook: Webhook) -> tuple[list[dict], list[dict]]:
    """The webhook's alerts and the ``alert`` audit events so far."""
    assert provider.alerts.flush(5)
    provider.audit.flush()
    return webhook.received, [e for e in provider.audit.query() if e["type"] == "alert"]


def suspensions(oauth, kind: str) -> float:
    metrics = oauth.http.get("/metrics").get_data(as_text=True)
    for line in metrics.splitlines():
        if line.startswith(f'provider_suspensions_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_family_past_the_threshold_is_suspended_and_alerted_once(oauth, caller, upstream,
                                                                    webhook):
    counted = {kind: suspensions(oauth, kind) for kind in ("family", "connection")}
    connection = deposit(oauth, caller, upstream)
    root = connection["access_token"]
    narrow = oauth.exchanged(caller, root, scope="files:read", resource=f"{GATEWAY}/files/abc")
    statuses = [call(oauth, narrow).status_code for _ in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429]

    # The whole family is revoked, the token it was exchanged from included.
    assert oauth.introspect(narrow) == {"active": False}
    assert oauth.introspect(root) == {"active": False}
    refused = call(oauth, root)
    assert refused.status_code == 401 and refused.get_json()["error"] == "invalid_token"
    assert call(oauth, narrow).status_code == 401

    # More calls after the suspension are refused before they are counted: no second alert.
    received, events = alerts(oauth.provider, webhook)
    kinds = sorted(alert["kind"] for alert in received)
    assert kinds == ["connection suspended", "family suspended"]
    assert all(alert["reason"] == REASON for alert in received)
    assert sorted(e["kind"] for e in events) == kinds
    assert {kind: suspensions(oauth, kind) - before for kind, before in counted.items()} == {
        "family": 1, "connection": 1}
    revocations = [e for e in oauth.provider.audit.query() if e["type"] == "revocation"]
    assert {e["reason"] for e in revocations} == {REASON}


@on_every_backend
@pytest.mark.parametrize("store", STORES)
def test_a_suspension_seen_by_two_instances_is_alerted_once(oauth, caller, upstream, webhook,
                                                            app_config, store):
    """Two instances can each count the call that crosses the threshold before either has
    seen the other's revocation (they sync within a second): both revoke, one alerts. Which
    one is told by the store they share: the database, or Redis when they have it."""
    config = {**app_config, "redis_url": REDIS_URL} if store == "redis" else app_config
    instances = [create_app(config).extensions["provider"] for _ in range(2)]
    try:
        family = deposit(oauth, caller, upstream)["access_token"]
        family_id = oauth.introspect(family)["jti"]
        for instance in instances:
            instance.suspend("family", family_id, REASON)
        for instance in instances:  # the same webhook, the same audit store
            received, events = alerts(instance, webhook)
        assert [alert["kind"] for alert in received] == ["family suspended"]
        assert [event["kind"] for event in events] == ["family suspended"]
        oauth.provider.revocations.sync(force=True)  # what a third instance does within a second
        assert oauth.introspect(family) == {"active": False}
    finally:
        for instance in instances:
            instance.audit.close()
            instance.storage.engine.dispose()
