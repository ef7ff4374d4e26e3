"""The audit trail: one structured JSON event per security-relevant action.

Every issuance, exchange (with the subject and actor ``jti``), refresh, introspection (by whom),
revocation (with its cause), deposit, decryption, gateway call (method, route template, status,
bytes), refusal and alert is recorded with :meth:`AuditLog.record`. Each event goes two ways:

* **the log**: one JSON line per event on the ``provider.audit`` logger (level INFO);
* **the store**: the ``audit_events`` table (append-only).

Both are written *asynchronously* by a daemon thread, in batches (at most ``batch_size``
events, at most ``flush_interval`` seconds old): first the batch's log lines as one log record
(one JSON event per line), then its rows in one transaction (multi-row ``INSERT``s: a
per-row ``executemany`` stalled the request thread, see :meth:`Storage.add_audit_events`). The
request path never waits for the log or the database: ``record()`` scrubs the event and puts
it on a bounded queue; the writer serialises its line. (Writing and flushing each line from the
request measured about a third of the audit's cost per request.)

What can be lost, and when:

* **A crash** (SIGKILL, OOM, power) loses the events queued in that process and not yet
  written, from the log and the store alike: at most one batch interval (``flush_interval``,
  0.5 s by default) of events, plus whatever piled up while the database was slow or down.
* **A full queue** (``max_queue`` events waiting: the database is down or far too slow) drops
  new events from the store and counts them (:attr:`AuditLog.dropped`); a warning with the
  count is logged at most once every 10 seconds. Their log lines are written at once, from the
  request, so that the log still has every event.
* **A normal exit** loses nothing: an ``atexit`` hook flushes the queue (gunicorn workers exit
  through ``sys.exit``, so they run it), and :meth:`AuditLog.close` does the same explicitly.

Processes. gunicorn builds the app in the master and then forks its workers (``preload_app``);
a thread started in the master does not exist in a worker. The writer thread is therefore
started lazily, by the first ``record()`` *in the current process* (checked with
``os.getpid()``), and a forked child starts with an empty queue of its own (events the parent
had queued are the parent's to write) and its own database connections.

Secrets. Events carry ``jti`` values and hashes, never a token, a secret, a client assertion or
an upstream credential. :meth:`AuditLog.record` also scrubs defensively: it drops every field
whose name contains ``token``, ``secret``, ``assertion``, ``password`` or ``credential``
(except ``jti``, names ending in ``_jti``, and names ending in ``_type`` or ``_type_hint``, which
name RFC 8693/7009 token types such as ``subject_token_type``), at any depth, and every string
value that contains a JWT, and lists what it dropped under ``redacted`` so that the caller can
be fixed. Field names ``time``, ``id``, ``data`` and ``redacted`` are reserved and dropped too.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import collections
import functools
import logging
import math
import os
import re
import threading
import time
import weakref
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from provider import fastjson
from provider.storage import Storage

log = logging.getLogger("provider.audit")  # every line one JSON event

# The id of the request being served, set per request, so that code which knows nothing of Flask
# can record events that carry it.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# The store's own troubles: not events, so not under "provider.audit".
_internal = logging.getLogger("provider.audit_store")

# Columns of ``audit_events`` that hold a string, with their lengths. A longer value is cut to
# fit its column and kept whole in ``data``, so that one odd value cannot fail a whole batch.
_COLUMNS = {"type": 64, "request_id": 32, "client_id": 255, "sub": 255, "jti": 64}
_RESERVED = frozenset({"time", "id", "data", "redacted", *_COLUMNS})
_SECRET_NAME = re.compile(r"token|secret|assertion|password|credential", re.IGNORECASE)
# A compact JWS or JWE: three (or five) base64url parts, the first a JSON object (so it starts
# "ey" or "ew"), anywhere in a string ("Bearer eyJ...", a query string...).
_JWT_CANDIDATE = re.compile(
    r"(?<![A-Za-z0-9_-])(e[wy][A-Za-z0-9_-]{14,})\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_DROP_WARNING_INTERVAL = 10.0
_WRITE_RETRIES = (0.2, 1.0)  # pauses before retrying a batch the database did not take
# The writer serialises and stores this many events at a time (one transaction: one INSERT, or
# on PostgreSQL one COPY), then yields the GIL: a request waits for one slice, not for a whole
# batch after the interpreter's 5 ms switch interval. With INSERTs, slices of 100 cost the
# writer 21 µs of CPU per event on SQLite and 38 µs on PostgreSQL, against 26 and 55 µs in
# slices of 25, with the bench's p99 at 4 connections unchanged (3.2-3.4 ms); in one worker,
# slices of 200 put the audit trail in the slowest 1% of requests.
_WRITE_SLICE = 100
# A batch of several slices is written with this pause (seconds) between them, so that the
# requests beside the writer are slowed a little for longer rather than much at once.
_SLICE_PAUSE = 0.001


class _Flush:
    """A marker on the queue: the writer sets ``done`` once everything before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()
_LINE = "_log"  # marks a row whose log line is still to be written


def _line(row: dict[str, Any]) -> str:
    """The event as one JSON line: its time, its columns (``data`` keeps the whole value of
    one cut to fit its column), then its other fields."""
    event = {"time": _iso(row["time"]), "type": row["type"], "request_id": row.get("request_id"),
             "client_id": row.get("client_id"), "sub": row.get("sub"), "jti": row.get("jti"),
             **row["data"]}
    return fastjson.dumps(event).decode("utf-8")


def _log_lines(rows: list[dict[str, Any]]) -> None:
    """Write the log lines of the rows marked for the log (taking the mark off): one log
    record, one JSON event a line."""
    lines = [_line(row) for row in rows if row.pop(_LINE, False)]
    if lines:
        try:
            log.info("\n".join(lines))
        except Exception:  # noqa: BLE001 - a broken handler must not stop the store.
            _internal.error("audit: could not write %d log line(s)", len(lines))


class AuditLog:
    """Record audit events to the ``provider.audit`` log and, in batches, to the database.

    ``enabled=False`` records nothing (no log line, no row, no thread): only for measuring
    what the audit trail costs.
    """

    # The writer wakes every flush_interval, or sooner once batch_size events wait. Waking once
    # per 200 events cost a client-credentials request 5 µs more CPU in one process than once
    # per 1000 (which under the bench's load is about every flush_interval anyway); between two
    # real servers, interleaved, the difference was within the noise (399 against 396 µs).
    def __init__(self, storage: Storage, *, batch_size: int = 1000, flush_interval: float = 0.5,
                 max_queue: int = 10000, enabled: bool = True):
        if batch_size < 1 or max_queue < 1 or flush_interval <= 0:
            raise ValueError("batch_size and max_queue must be at least 1, flush_interval above 0")
        self.storage = storage
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.enabled = enabled
        self.dropped = 0  # events the store never received (queue full or database refusal)
        self._fresh_process_state()
        self._closed = False
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _call(reference, "_after_fork_in_child"))
        atexit.register(_call, reference, "close")

    def _fresh_process_state(self) -> None:
        """Queue, locks and thread of this process (new ones after a fork: the parent's locks
        may have been held by a thread that does not exist here)."""
        # A deque, not a queue.Queue: appending and popping are atomic without its locks and
        # condition variables, which the request paid for on every event.
        self._queue: collections.deque[Any] = collections.deque()
        self._start_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._pid: int | None = None
        self._dropped_unreported = 0
        self._last_drop_warning = float("-inf")

    def _after_fork_in_child(self) -> None:
        self._fresh_process_state()
        self.storage.dispose()  # never share the parent's pooled connections

    # Recording ----------------------------------------------------------------------------

    def record(self, type: str, *, request_id: str | None = None, client_id: str | None = None,
               sub: str | None = None, jti: str | None = None, **fields: Any) -> None:
        """Record one event. Never blocks, and never raises: an audit problem must not fail
        the request it describes."""
        if not self.enabled:
            return
        try:
            row = self._event(type, request_id, client_id, sub, jti, fields)
        except Exception as exc:  # noqa: BLE001 - reported below, without the event's values.
            _internal.error("audit: could not record a %r event (%s)", type, _type_name(exc))
            return
        if self._closed:  # after close(), e.g. from another atexit hook: write it now
            self._write([row])
            return
        self._ensure_writer()
        waiting = len(self._queue)
        if waiting >= self.max_queue:
            _log_lines([row])  # the store loses it; the log must not
            self._count_dropped(1)
            return
        self._queue.append(row)
        if waiting + 1 >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def _event(self, type: str, request_id: str | None, client_id: str | None, sub: str | None,
               jti: str | None, fields: dict[str, Any]) -> dict[str, Any]:
        """The scrubbed row; ``_LINE`` marks it for the log (taken off before it is stored)."""
        now = time.time()
        redacted: list[str] = []
        data = _scrub_mapping(fields, "", redacted, top_level=True)
        columns: dict[str, Any] = {"type": type, "request_id": request_id,
                                   "client_id": client_id, "sub": sub, "jti": jti}
        for name, value in columns.items():
            if value is None:
                continue
            value = _clean_string(value if isinstance(value, str) else str(value))
            if _contains_jwt(value):
                redacted.append(name)
                value = None if name != "type" else "redacted"
            elif len(value) > _COLUMNS[name]:
                data[name] = value  # the column holds a prefix; query() shows the whole value
                value = value[:_COLUMNS[name]]
            columns[name] = value
        if redacted:
            data["redacted"] = sorted(set(redacted))
        row = {"time": now, **columns, "data": data}
        if log.isEnabledFor(logging.INFO):
            row[_LINE] = True  # the writer serialises it: nothing more to do on the request
        return row

    def _ensure_writer(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._start_lock:
            if self._pid == pid:
                return
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
            self._pid = pid

    def _count_dropped(self, count: int) -> None:
        with self._drop_lock:
            self.dropped += count
            self._dropped_unreported += count
            now = time.monotonic()
            if now - self._last_drop_warning < _DROP_WARNING_INTERVAL:
                return
            unreported, self._dropped_unreported = self._dropped_unreported, 0
            self._last_drop_warning = now
        _internal.warning("audit store: dropped %d event(s) (queue full or database refusing them; "
                          "their log lines were written), %d in total", unreported, self.dropped)

    # Flushing -----------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> None:
        """Write every event queued so far, waiting at most ``timeout`` seconds."""
        if not self.enabled:
            return
        if self._writer_alive():
            marker = _Flush()
            self._queue.append(marker)  # a marker is never refused: the bound is for events
            self._wake.set()
            if not marker.done.wait(timeout):
                _internal.warning("audit store: flush timed out after %.1f s", timeout)
            return
        # No writer in this process (none started yet, or closed): write here.
        batch: list[dict[str, Any]] = []
        while True:
            try:
                item = self._queue.popleft()
            except IndexError:
                break
            if isinstance(item, dict):
                batch.append(item)
            elif isinstance(item, _Flush):
                item.done.set()
            if len(batch) >= self.batch_size:
                self._write(batch)
                batch = []
        self._write(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, then stop the writer thread. Later events are written synchronously."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        if self._writer_alive():
            self._queue.append(_STOP)
            self._wake.set()
            assert self._thread is not None
            self._thread.join(timeout)
        self.flush(timeout)  # anything recorded between the two

    def _writer_alive(self) -> bool:
        return (self._pid == os.getpid() and self._thread is not None
                and self._thread.is_alive())

    # The writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        """Every ``flush_interval`` (or when woken by a full batch, a flush or close), drain the
        queue in batches. It does not wait on the queue itself: that would wake this thread,
        and hand it the GIL, for every single event."""
        q = self._queue
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stop = False
            while True:
                batch: list[dict[str, Any]] = []
                markers: list[_Flush] = []
                while len(batch) < self.batch_size:
                    try:
                        item = q.popleft()
                    except IndexError:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    if isinstance(item, _Flush):
                        markers.append(item)
                    else:
                        batch.append(item)
                for start in range(0, len(batch), _WRITE_SLICE):
                    if start:
                        time.sleep(_SLICE_PAUSE)
                    self._write(batch[start:start + _WRITE_SLICE])
                time.sleep(0)  # hand the GIL to a request waiting for it
                for marker in markers:
                    marker.done.set()
                if stop:
                    return
                if len(batch) < self.batch_size:
                    break  # drained

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` as one batch; retry a failing batch, then row by row, then count the
        rows the database refused as dropped. Their log lines go first. Never raises."""
        _log_lines(rows)
        if not rows:
            return
        for pause in (*_WRITE_RETRIES, None):
            try:
                self.storage.add_audit_events(rows)
                return
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failure.
                failure = exc
            if pause is not None:
                time.sleep(pause)
        _internal.error("audit store: a batch of %d events failed (%s); writing them one by one",
                        len(rows), _type_name(failure))
        refused = 0
        for row in rows:
            try:
                self.storage.add_audit_events([row])
            except Exception:  # noqa: BLE001 - counted and reported below.
                refused += 1
        if refused:
            self._count_dropped(refused)

    # Reading ------------------------------------------------------------------------------

    def query(self, since: float | None = None, subject: str | None = None,
              limit: int = 1000) -> list[dict[str, Any]]:
        """Stored events at or after ``since`` (seconds since the epoch) whose ``sub`` is
        ``subject``; the newest ``limit`` of them, newest last. Events still queued are not
        included: :meth:`flush` first to see them."""
        events = []
        for row in self.storage.audit_events(since=since, subject=subject, limit=max(1, limit)):
            event = {"time": _iso(row["time"]), "type": row["type"],
                     "request_id": row["request_id"], "client_id": row["client_id"],
                     "sub": row["sub"], "jti": row["jti"]}
            event.update(row["data"] or {})
            events.append(event)
        return events


# Scrubbing ----------------------------------------------------------------------------------


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    if lowered == "jti" or lowered.endswith(("_jti", "_type", "_type_hint")):
        return False  # a token's id, or an RFC 8693/7009 token type name: never the token
    return bool(_SECRET_NAME.search(lowered))


def _contains_jwt(text: str) -> bool:
    if "." not in text:  # every compact JWS has two: most values are out at a fifth of the cost
        return False
    for match in _JWT_CANDIDATE.finditer(text):
        header = match.group(1)
        try:
            decoded = fastjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
        except (ValueError, binascii.Error):
            continue
        if isinstance(decoded, dict):
            return True
    return False


def _clean_string(text: str) -> str:
    """``text`` as every database takes it: PostgreSQL refuses NUL characters, and no UTF-8
    encoder takes a lone surrogate (half a UTF-16 pair, which a parser of ``\\ud800`` escapes
    makes); each becomes U+FFFD, so that one such value cannot fail a whole batch."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _scrub(value: Any, path: str, redacted: list[str]) -> Any:
    """A JSON-ready copy of ``value`` without secret-named keys or JWT-bearing strings;
    ``_DROP`` if ``value`` itself must go."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN
    if isinstance(value, str):
        if _contains_jwt(value):
            redacted.append(path)
            return _DROP
        return _clean_string(value)
    if isinstance(value, dict):
        return _scrub_mapping(value, path + ".", redacted)
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        cleaned = [_scrub(item, f"{path}[]", redacted) for item in items]
        return [item for item in cleaned if item is not _DROP]
    return _scrub(str(value), path, redacted)


def _scrub_mapping(mapping: dict[Any, Any], prefix: str, redacted: list[str],
                   top_level: bool = False) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in mapping.items():
        name = _clean_string(str(key))
        path = prefix + name
        if _secret_name(name) or (top_level and name in _RESERVED):
            redacted.append(path)
            continue
        value = _scrub(value, path, redacted)
        if value is not _DROP:
            cleaned[name] = value
    return cleaned


_DROP = object()


def _iso(timestamp: float) -> str:
    """``2026-11-29T14:01:11.123Z``. The writer formats one per event: the date and time of
    day are formatted once a second (a third of the cost of ``datetime.isoformat``)."""
    fraction, seconds = math.modf(timestamp)
    micros = round(fraction * 1_000_000)  # rounded to the microsecond first, as datetime does
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return f"{_iso_second(int(seconds))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _type_name(exc: BaseException) -> str:
    return type(exc).__name__


def _call(reference: weakref.ref[AuditLog], method: str) -> None:
    instance = reference()
    if instance is not None:
        getattr(instance, method)()


__all__ = ["AuditLog"]
