"""Alerts (provider/alerts.py): the webhook gets JSON, and never holds up the caller."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime

import pytest

from provider import alerts as alerts_module
from provider.alerts import Alerts
from tests.servers import SECRET_PATH, Webhook, free_port


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "provider.alerts")


def test_send_posts_the_alert_as_json(webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "provider.alerts")
    alerts = Alerts(webhook.url)
    alerts.send("family_suspended", family="f-1", client_id="client-a", calls=6001)
    assert alerts.flush(5)
    [alert] = webhook.received
    assert webhook.content_types == ["application/json"]
    assert {k: alert[k] for k in ("kind", "family", "client_id", "calls")} == {
        "kind": "family_suspended", "family": "f-1", "client_id": "client-a", "calls": 6001}
    assert datetime.fromisoformat(alert["time"].replace("Z", "+00:00")).tzinfo is not None
    assert "family_suspended" in messages(caplog)  # always logged as well
    assert SECRET_PATH not in messages(caplog)


def test_a_slow_webhook_does_not_block_send_and_times_out_in_the_background(
        webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "provider.alerts")
    webhook.delay = 5
    alerts = Alerts(webhook.url, timeout=0.5)
    started = time.monotonic()
    alerts.send("connection_suspended", connection_id="c-1")
    assert time.monotonic() - started < 0.1
    started = time.monotonic()
    assert alerts.flush(4.5)  # cut off by the 0.5 s timeout, long before the webhook answers
    assert time.monotonic() - started < 4.5
    logged = messages(caplog)
    assert "timed out" in logged and "127.0.0.1" in logged and SECRET_PATH not in logged


def test_an_unreachable_webhook_is_logged_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "provider.alerts")
    alerts = Alerts(f"http://127.0.0.1:{free_port()}{SECRET_PATH}", timeout=1)
    alerts.send("family_suspended", family="f-1")
    assert alerts.flush(5)
    logged = messages(caplog)
    assert "could not connect" in logged and SECRET_PATH not in logged


def test_a_webhook_error_status_is_logged(webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "provider.alerts")
    webhook.status = 500
    alerts = Alerts(webhook.url)
    alerts.send("family_suspended", family="f-1")
    assert alerts.flush(5)
    assert "answered 500" in messages(caplog)


def test_without_a_webhook_alerts_are_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "provider.alerts")
    alerts = Alerts("")
    alerts.send("family_suspended", family="f-1")
    assert alerts.flush(0)
    [record] = [r for r in caplog.records if r.name == "provider.alerts"]
    assert record.levelno == logging.WARNING and "f-1" in record.getMessage()


def test_a_full_queue_drops_alerts_instead_of_waiting(
        webhook: Webhook, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, "provider.alerts")
    monkeypatch.setattr(alerts_module, "QUEUE_SIZE", 2)
    webhook.delay = 5
    alerts = Alerts(webhook.url, timeout=5)
    started = time.monotonic()
    for number in range(10):
        alerts.send("family_suspended", number=number)
    assert time.monotonic() - started < 1
    assert "queue is full" in messages(caplog)
    webhook.release.set()
    assert alerts.flush(10)
    assert 1 <= len(webhook.received) <= 3  # one in flight, two queued; the rest dropped


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_starts_its_own_sender(webhook: Webhook) -> None:
    alerts = Alerts(webhook.url)
    alerts.send("before_fork")
    assert alerts.flush(5)
    pid = os.fork()
    if pid == 0:  # the child: the parent's sender thread did not survive the fork
        try:
            alerts.send("in_child")
            os._exit(0 if alerts.flush(5) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [a["kind"] for a in webhook.received] == ["before_fork", "in_child"]
