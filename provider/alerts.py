"""Security alerts: logged, and POSTed to ``[alerts].webhook_url`` without blocking requests.

:meth:`Alerts.send` logs the alert at WARNING on ``provider.alerts`` and, when a webhook is
configured, hands the POST to one background thread per process through a bounded queue.
The request that raised the alert never waits for the webhook: a slow webhook is cut off by
``timeout`` in the background, a failing one is logged (the webhook's host only: webhook URLs
often carry a secret in their path), and when the queue is full the alert is dropped (and
logged) rather than held in memory or made to wait.

The thread starts lazily at the first alert of each process: gunicorn forks workers from a
master that may have built the provider, and a thread does not survive a fork.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import urllib3

log = logging.getLogger("provider.alerts")

QUEUE_SIZE = 256
"""Alerts waiting to be sent, per process; more are dropped."""


class _Sender:
    """One process's queue, thread and HTTP pool."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self.pid = os.getpid()
        self.queue: queue.Queue[tuple[str, bytes]] = queue.Queue(QUEUE_SIZE)
        self.pending = 0
        self.done = threading.Condition()
        self.http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout, total=timeout),
            retries=False,
        )
        self.thread = threading.Thread(target=self._run, name="provider-alerts", daemon=True)
        self.thread.start()

    def submit(self, kind: str, body: bytes) -> bool:
        with self.done:
            try:
                self.queue.put_nowait((kind, body))
            except queue.Full:
                return False
            self.pending += 1
        return True

    def flush(self, timeout: float) -> bool:
        with self.done:
            return self.done.wait_for(lambda: self.pending == 0, timeout)

    def _run(self) -> None:
        while True:
            kind, body = self.queue.get()
            try:
                self._post(kind, body)
            except Exception:  # the sender thread must survive anything
                log.exception("alert %s: unexpected error while sending it", kind)
            finally:
                with self.done:
                    self.pending -= 1
                    self.done.notify_all()

    def _post(self, kind: str, body: bytes) -> None:
        target = _where(self.url)
        try:
            response = self.http.request(
                "POST", self.url, body=body,
                headers={"Content-Type": "application/json", "User-Agent": "token-provider"},
                redirect=False, preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            log.warning("alert %s: webhook at %s failed: %s", kind, target, _reason(exc))
            return
        try:
            if not 200 <= response.status < 300:
                log.warning("alert %s: webhook at %s answered %d", kind, target, response.status)
        finally:
            response.release_conn()


class Alerts:
    def __init__(self, webhook_url: str, timeout: float = 2.0):
        self.webhook_url = webhook_url
        self.timeout = timeout
        self._sender: _Sender | None = None
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()

    def send(self, kind: str, **fields: Any) -> None:
        """Log the alert and queue its POST; never blocks and never raises for the webhook.

        ``fields`` (ids, counts, reasons) are logged and sent as they are: never pass a token
        or a secret. A field named ``kind`` or ``time`` is overwritten.
        """
        document = {**fields, "kind": kind, "time": _now()}
        body = json.dumps(document, default=str, sort_keys=True)
        log.warning("alert %s: %s", kind, body)
        if not self.webhook_url:
            return
        if not self._current_sender().submit(kind, body.encode("utf-8")):
            log.warning("alert %s: the alert queue is full; not sent to the webhook", kind)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued alert has been sent or has failed; False on timeout."""
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            return True
        return sender.flush(timeout)

    def _current_sender(self) -> _Sender:
        pid = os.getpid()
        sender = self._sender
        if sender is not None and sender.pid == pid:
            return sender
        if self._lock_pid != pid:  # forked: the parent's lock may have been held at the fork
            self._lock, self._lock_pid = threading.Lock(), pid
        with self._lock:
            sender = self._sender
            if sender is None or sender.pid != pid:
                sender = self._sender = _Sender(self.webhook_url, self.timeout)
            return sender


def _now() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _where(url: str) -> str:
    """The webhook's scheme, host and port: its path and query may hold a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _reason(exc: Exception) -> str:
    """Why a POST failed, without the URL (urllib3 puts it in some messages)."""
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError subclass
        return "could not connect"
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return "timed out"
    return type(exc).__name__
