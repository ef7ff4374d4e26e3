"""The audit trail: record, flush, query; a bounded queue that never blocks; no secrets; one
writer per process (gunicorn forks after building the app); the ``audit`` command."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner

from provider import audit as audit_module
from provider.audit import AuditLog
from provider.cli import cli
from provider.storage import Storage, create_engine, migrate, schema
from tests.conftest import on_every_backend

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def storage(database_url: str) -> Iterator[Storage]:
    engine = create_engine(database_url)
    migrate(engine)
    yield Storage(engine)
    engine.dispose()


@pytest.fixture
def audit(storage: Storage) -> Iterator[AuditLog]:
    log = AuditLog(storage, flush_interval=0.05)
    yield log
    log.close()


def a_jwt(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "jti": "j-1", **claims}, "k" * 32, algorithm="HS256")


def stored_text(storage: Storage) -> str:
    with storage.engine.connect() as connection:
        return repr(connection.execute(sa.select(schema.audit_events)).all())


# Record, flush, query ---------------------------------------------------------------------


@on_every_backend
def test_recorded_events_are_queried_back_oldest_first_after_flush(audit):
    audit.record("issue", request_id="r1", client_id="svc", sub="alice", jti="j1",
                 grant_type="client_credentials", scope="read")
    audit.record("exchange", request_id="r2", client_id="svc", sub="alice", jti="j2",
                 subject_jti="j1", actor_jti="a9", scope="read", depth=1,
                 act={"sub": "bot", "client_id": "svc"})
    audit.record("gateway", request_id="r3", client_id="svc", sub="alice", jti="j2",
                 method="GET", route="/files/{id}", status=200, bytes=512)
    audit.flush()

    events = audit.query()
    assert [e["type"] for e in events] == ["issue", "exchange", "gateway"]
    issue, exchange, gateway = events
    assert ISO_UTC.match(issue["time"])
    assert issue == {"time": issue["time"], "type": "issue", "request_id": "r1", "client_id": "svc",
                     "sub": "alice", "jti": "j1", "grant_type": "client_credentials",
                     "scope": "read"}
    assert exchange["subject_jti"] == "j1" and exchange["actor_jti"] == "a9"
    assert exchange["act"] == {"sub": "bot", "client_id": "svc"} and exchange["depth"] == 1
    assert gateway["route"] == "/files/{id}" and gateway["status"] == 200
    assert gateway["bytes"] == 512


@on_every_backend
def test_query_filters_by_since_and_subject_and_keeps_the_newest_last(storage, audit):
    rows = [{"time": t, "type": "issue", "request_id": None, "client_id": "svc", "sub": sub,
             "jti": f"j{t}", "data": {}}
            for t, sub in ((100.0, "alice"), (200.0, "bob"), (300.0, "alice"), (400.0, "alice"))]
    storage.add_audit_events(rows)

    assert [e["jti"] for e in audit.query()] == ["j100.0", "j200.0", "j300.0", "j400.0"]
    assert [e["jti"] for e in audit.query(since=200.0)] == ["j200.0", "j300.0", "j400.0"]
    assert [e["jti"] for e in audit.query(subject="alice")] == ["j100.0", "j300.0", "j400.0"]
    assert [e["jti"] for e in audit.query(since=150, subject="alice")] == ["j300.0", "j400.0"]
    assert [e["jti"] for e in audit.query(limit=2)] == ["j300.0", "j400.0"]
    assert audit.query(subject="nobody") == []


def test_events_reach_the_store_within_the_flush_interval_without_a_flush(audit):
    audit.record("refresh", client_id="svc", sub="alice", jti="j1")
    deadline = time.monotonic() + 5
    while not audit.query() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [e["type"] for e in audit.query()] == ["refresh"]


def test_a_full_batch_is_written_at_once_not_at_the_flush_interval(storage):
    log = AuditLog(storage, batch_size=10, flush_interval=60)
    try:
        for round_ in range(3):  # the writer is woken for each batch, not only the first
            for n in range(10):
                log.record("issue", client_id="svc", jti=f"j{round_}-{n}")
            deadline = time.monotonic() + 5
            while len(log.query()) < 10 * (round_ + 1) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(log.query()) == 10 * (round_ + 1)
    finally:
        log.close()


def test_every_event_is_one_json_line_on_the_provider_audit_log_with_its_batch(audit, caplog):
    caplog.set_level(logging.INFO, logger="provider.audit")
    audit.record("revoke", request_id="r1", client_id="svc", sub="alice", jti="j1",
                 cause="revoked by operator")
    audit.record("issue", request_id="r2", client_id="svc", sub="alice", jti="j2")
    audit.flush()
    records = [r for r in caplog.records if r.name == "provider.audit"]
    assert records and all(r.levelno == logging.INFO for r in records)
    events = [json.loads(line) for r in records for line in r.getMessage().splitlines()]
    assert [e["type"] for e in events] == ["revoke", "issue"]
    assert events[0]["cause"] == "revoked by operator"
    assert ISO_UTC.match(events[0]["time"]) and events[0]["jti"] == "j1"


@pytest.mark.parametrize("timestamp", [
    0.5, 86399.9994, 86399.9995, 1795960964.123456, 1795960964.9999996, 1882410952.7079995,
    1773107810.5639994, 4102444799.999])
def test_event_times_are_those_datetime_writes_to_the_millisecond(timestamp):
    # The writer formats each second's date once; the milliseconds must still round like
    # datetime's, at the edges of a second too.
    expected = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    assert audit_module._iso(timestamp) == expected.replace("+00:00", "Z")


def test_a_batch_is_written_in_one_transaction(storage):
    calls: list[int] = []
    original = storage.add_audit_events

    def counting(rows):
        rows = list(rows)
        calls.append(len(rows))
        original(rows)

    storage.add_audit_events = counting
    log = AuditLog(storage, batch_size=50, flush_interval=0.5)
    for n in range(120):
        log.record("introspect", client_id="rs", jti=f"j{n}")
    log.close()
    assert sum(calls) == 120 and max(calls) <= 50 and len(calls) <= 6
    assert len(log.query(limit=500)) == 120


@on_every_backend
def test_a_batch_longer_than_one_insert_statement_is_stored_whole_and_in_order(storage, audit):
    from provider.storage import AUDIT_ROWS_PER_STATEMENT

    count = 2 * AUDIT_ROWS_PER_STATEMENT + 7
    storage.add_audit_events([
        {"time": 1000.0 + n, "type": "issue", "client_id": "svc", "sub": "ålice", "jti": f"j{n}",
         "data": {"n": n, "act": {"sub": "bøt"}, "scopes": ["a", "b"], "note": None}}
        for n in range(count)])
    events = audit.query(limit=count + 1)
    assert [e["jti"] for e in events] == [f"j{n}" for n in range(count)]
    assert events[-1]["request_id"] is None and events[-1]["sub"] == "ålice"
    assert events[-1]["n"] == count - 1 and events[-1]["act"] == {"sub": "bøt"}
    assert events[-1]["scopes"] == ["a", "b"] and events[-1]["note"] is None


@on_every_backend
def test_values_too_long_for_their_column_or_holding_nul_do_not_fail_the_batch(audit):
    long_jti = "x" * 300
    audit.record("refusal", client_id="c" * 400, sub="eve\x00", jti=long_jti, reason="bad")
    audit.record("issue", sub="alice", jti="j1")
    audit.flush()
    refusal, issue = audit.query()
    assert refusal["jti"] == long_jti and refusal["client_id"] == "c" * 400
    assert refusal["sub"] == "eve\ufffd" and issue["jti"] == "j1"
    assert audit.dropped == 0


@on_every_backend
def test_lone_surrogates_in_columns_do_not_fail_the_batch(audit):
    # A str may hold half a UTF-16 pair (a parser of escapes made it); no database encodes one.
    audit.record("refusal", client_id="svc\udc00", sub="eve\ud800", reason="bad")
    audit.record("issue", sub="alice", jti="j1")
    audit.flush()
    refusal, issue = audit.query()
    assert refusal["sub"] == "eve\ufffd" and refusal["client_id"] == "svc\ufffd"
    assert issue["jti"] == "j1" and audit.dropped == 0


@on_every_backend
def test_an_integer_the_fast_json_encoder_refuses_still_reaches_the_log_and_the_store(audit,
                                                                                      caplog):
    # orjson refuses integers beyond 64 bits: such an event must be written all the same, and
    # the writer go on with the next.
    caplog.set_level(logging.INFO, logger="provider.audit")
    audit.record("refusal", reason="odd", count=2**70, nested={"counts": [-(2**70)]})
    audit.record("issue", sub="alice", jti="j1")
    audit.flush()
    odd, issue = audit.query()
    assert odd["count"] == 2**70 and odd["nested"] == {"counts": [-(2**70)]}
    assert issue["jti"] == "j1" and audit.dropped == 0
    lines = [json.loads(line) for r in caplog.records if r.name == "provider.audit"
             for line in r.getMessage().splitlines()]
    assert [(e["type"], e.get("count")) for e in lines] == [("refusal", 2**70), ("issue", None)]


# A bounded queue --------------------------------------------------------------------------


class SlowStorage:
    """A store that takes no rows until ``release`` is set (a database that has stalled)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.rows: list[dict[str, Any]] = []

    def add_audit_events(self, rows):
        self.release.wait(30)
        self.rows.extend(rows)

    def dispose(self) -> None:
        pass


def test_a_full_queue_drops_and_counts_events_without_blocking(caplog):
    caplog.set_level(logging.INFO, logger="provider.audit")
    store = SlowStorage()
    log = AuditLog(store, batch_size=1, flush_interval=0.01, max_queue=5)  # type: ignore[arg-type]
    started = time.monotonic()
    for n in range(50):
        log.record("issue", jti=f"j{n}")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0  # the stalled store never held up record()
    assert 44 <= log.dropped <= 45  # 5 queued, perhaps 1 taken by the writer, the rest dropped

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # at most one warning per 10 seconds
    assert "dropped 1 event(s)" in warnings[0].getMessage()
    store.release.set()
    log.close()
    audit_lines = [line for r in caplog.records if r.name == "provider.audit"
                   for line in r.getMessage().splitlines()]
    assert len(audit_lines) == 50  # the log still has every event, dropped from the store or not
    assert len(store.rows) + log.dropped == 50
    written = [int(r["jti"][1:]) for r in store.rows]
    assert written == sorted(written) and written[:5] == [0, 1, 2, 3, 4]


def test_a_database_refusing_a_row_drops_only_that_row(storage, monkeypatch):
    original = storage.add_audit_events

    def picky(rows):
        rows = list(rows)
        if any(r["jti"] == "poison" for r in rows):
            raise sa.exc.DataError("INSERT", {}, Exception("refused"))
        original(rows)

    monkeypatch.setattr(storage, "add_audit_events", picky)
    monkeypatch.setattr("provider.audit._WRITE_RETRIES", (0.0,))
    log = AuditLog(storage)
    for jti in ("a", "poison", "b"):
        log.record("issue", jti=jti)
    log.close()
    assert [e["jti"] for e in log.query()] == ["a", "b"] and log.dropped == 1


# No secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "access_token", "refresh_token", "subject_token", "actor_token", "id_token", "token",
    "client_secret", "secret", "client_assertion", "assertion", "password", "upstream_credential",
    "credentials", "Access_Token",
])
def test_fields_named_like_a_secret_are_dropped(audit, caplog, name):
    caplog.set_level(logging.INFO, logger="provider.audit")
    audit.record("deposit", sub="alice", **{name: "s3cr3t-value", "scope": "read"})
    audit.flush()
    [event] = audit.query()
    assert name not in event and event["scope"] == "read"
    assert event["redacted"] == [name]
    assert "s3cr3t-value" not in caplog.text and "s3cr3t-value" not in stored_text(audit.storage)


@pytest.mark.parametrize("name", [
    "jti", "subject_jti", "actor_jti", "token_jti", "subject_token_type", "issued_token_type",
    "token_type_hint", "scope", "cause", "family_id",
])
def test_jtis_token_type_names_and_plain_fields_are_kept(audit, name):
    fields = {"request_id": "r1"} if name == "jti" else {}
    audit.record("exchange", **fields, **{name: "kept-value"})
    audit.flush()
    [event] = audit.query()
    assert event[name] == "kept-value" and "redacted" not in event


def _five_part_jwe() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"RSA-OAEP-256","enc":"A256GCM"}').rstrip(b"=")
    return header.decode() + ".a2V5.aXY.Y2lwaGVydGV4dA.dGFn"


@pytest.mark.parametrize("value", [
    a_jwt(), "Bearer " + a_jwt(), f"token={a_jwt()}&x=1", a_jwt().rsplit(".", 1)[0] + ".",
    _five_part_jwe(),
], ids=["jws", "bearer-header", "in-a-query-string", "unsecured", "jwe"])
def test_string_values_holding_a_jwt_are_dropped_at_any_depth(audit, caplog, value):
    caplog.set_level(logging.INFO, logger="provider.audit")
    audit.record("refusal", sub="alice", note=value, detail={"header": value, "list": [value, "ok"]},
                 reason="invalid_request")
    audit.flush()
    [event] = audit.query()
    assert "note" not in event and event["detail"] == {"list": ["ok"]}
    assert event["reason"] == "invalid_request"
    assert event["redacted"] == ["detail.header", "detail.list[]", "note"]
    body = value.split(".")[1]
    assert body not in caplog.text and body not in stored_text(audit.storage)


def test_a_field_that_cannot_be_recorded_is_reported_and_never_raises(audit, caplog):
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    audit.record("alert", detail=Unprintable())
    audit.record("alert", detail="fine")
    audit.flush()
    assert [e["detail"] for e in audit.query()] == ["fine"]
    assert "could not record a 'alert' event (RuntimeError)" in caplog.text


def test_a_jwt_passed_as_sub_or_jti_is_dropped_too(audit):
    token = a_jwt()
    audit.record("introspect", client_id="rs", sub=token, jti=token)
    audit.flush()
    [event] = audit.query()
    assert event["sub"] is None and event["jti"] is None
    assert event["redacted"] == ["jti", "sub"]


@pytest.mark.parametrize("value", ["api.example.com", "files.read", "1.2.3", "eyes.on.it",
                                   "https://upstream.example/api/v1.2/x.y"])
def test_dotted_strings_that_are_not_jwts_are_kept(audit, value):
    audit.record("gateway", upstream=value)
    audit.flush()
    assert audit.query()[0]["upstream"] == value


# Processes --------------------------------------------------------------------------------


def _record_in_child(log: AuditLog, label: str, count: int, finish: str) -> None:
    for n in range(count):
        log.record("child", sub=label, jti=f"{label}-{n}")
    if finish == "close":
        log.close()
    else:
        log.flush()


@on_every_backend
@pytest.mark.parametrize("parent_recorded_first", [False, True],
                         ids=["like-gunicorn-master", "parent-writer-running"])
@pytest.mark.parametrize("finish", ["flush", "close"])
def test_a_forked_child_starts_its_own_writer_and_writes_its_events(audit, parent_recorded_first,
                                                                     finish):
    if parent_recorded_first:
        audit.record("parent", sub="parent", jti="p-0")
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_record_in_child, args=(audit, "forked", 3, finish))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    audit.record("parent", sub="parent", jti="p-1")
    audit.flush()

    assert [e["jti"] for e in audit.query(subject="forked")] == ["forked-0", "forked-1", "forked-2"]
    parent_jtis = [e["jti"] for e in audit.query(subject="parent")]
    assert parent_jtis == (["p-0", "p-1"] if parent_recorded_first else ["p-1"])


def test_events_queued_before_a_fork_are_written_once_by_the_parent(storage):
    log = AuditLog(storage, flush_interval=0.5)
    log.record("before-fork", jti="b")
    pid = os.fork()
    if pid == 0:  # the child: write its own event, then leave without pytest's teardown
        code = 1
        try:
            log.record("in-child", jti="c")
            log.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log.close()
    assert sorted(e["type"] for e in log.query()) == ["before-fork", "in-child"]


def test_a_normal_exit_flushes_what_is_queued(tmp_path):
    url = f"sqlite:///{tmp_path}/exit.db"
    migrate(create_engine(url))
    script = (
        "import sys; from provider.audit import AuditLog; "
        "from provider.storage import Storage, create_engine; "
        "log = AuditLog(Storage(create_engine(sys.argv[1])), flush_interval=60); "
        "[log.record('issue', jti=f'j{n}') for n in range(3)]"
    )
    subprocess.run([sys.executable, "-c", script, url], check=True, cwd=REPO, timeout=60)
    events = AuditLog(Storage(create_engine(url)), enabled=False).query()
    assert [e["jti"] for e in events] == ["j0", "j1", "j2"]


def test_close_flushes_stops_the_writer_and_later_events_are_written_at_once(storage):
    log = AuditLog(storage, flush_interval=60)
    log.record("issue", jti="j1")
    thread = log._thread
    log.close()
    assert thread is not None and not thread.is_alive()
    assert [e["jti"] for e in log.query()] == ["j1"]
    log.record("issue", jti="j2")
    assert [e["jti"] for e in log.query()] == ["j1", "j2"]


def test_disabled_audit_records_nothing(storage, caplog):
    caplog.set_level(logging.INFO, logger="provider.audit")
    log = AuditLog(storage, enabled=False)
    log.record("issue", jti="j1")
    log.flush()
    log.close()
    assert log._thread is None and log.query() == []
    assert '"jti":"j1"' not in caplog.text


# Schema -----------------------------------------------------------------------------------


@on_every_backend
def test_the_migration_creates_the_table_schema_py_declares(storage):
    with storage.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), schema.metadata)
    assert [d for d in differences if "audit_events" in repr(d)] == []


# Command line -----------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run(*args: str) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
def trail(env) -> Storage:
    run("init")
    store = Storage(create_engine(env["PROVIDER_DATABASE_URL"]))
    store.add_audit_events([
        {"time": at("2024-01-01T00:00:00"), "type": "issue", "request_id": "r1",
         "client_id": "svc", "sub": "alice", "jti": "j1", "data": {"grant_type": "client_credentials"}},
        {"time": at("2024-06-01T00:00:00"), "type": "issue", "request_id": "r2",
         "client_id": "svc", "sub": "bob", "jti": "j2", "data": {}},
    ])
    log = AuditLog(store)
    log.record("exchange", request_id="r3", client_id="svc", sub="alice", jti="j3",
               subject_jti="j1", actor_jti="a1", subject_token=a_jwt())
    log.close()
    yield store
    store.engine.dispose()


def test_audit_command_prints_every_event_as_json(trail):
    events = run("audit")
    assert [e["jti"] for e in events] == ["j1", "j2", "j3"]
    assert events[0]["time"] == "2024-01-01T00:00:00.000Z"
    for event in events:
        assert {"time", "type", "client_id", "sub", "jti"} <= set(event)
    exchange = events[2]
    assert exchange["subject_jti"] == "j1" and exchange["actor_jti"] == "a1"
    assert "subject_token" not in exchange and "eyJ" not in json.dumps(events)


@pytest.mark.parametrize(("options", "expected"), [
    (("--since", "2024-03-01"), ["j2", "j3"]),
    (("--since", "2024-06-01T00:00:00Z"), ["j2", "j3"]),
    (("--since", "2024-06-01T02:00:00+02:00"), ["j2", "j3"]),
    (("--since", "2024-06-01T00:00:01"), ["j3"]),
    (("--subject", "alice"), ["j1", "j3"]),
    (("--subject", "alice", "--since", "2024-03-01"), ["j3"]),
    (("--subject", "nobody"), []),
    (("--limit", "1"), ["j3"]),
])
def test_audit_command_filters_by_since_and_subject(trail, options, expected):
    assert [e["jti"] for e in run("audit", *options)] == expected


def test_audit_command_prints_one_line_per_event_without_json(trail):
    result = invoke("audit", "--subject", "alice")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("2024-01-01T00:00:00.000Z  issue  ")
    assert "subject_jti=j1" in lines[1] and "actor_jti=a1" in lines[1]


@pytest.mark.parametrize("since", ["yesterday", "2024-13-01", ""])
def test_audit_command_refuses_a_since_that_is_not_iso_8601(trail, since):
    result = invoke("audit", "--since", since)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --since")
    assert result.stdout == ""
