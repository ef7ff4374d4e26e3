"""Rate limits (provider/ratelimit.py) on in-process memory and on a real Redis.

The Redis variant uses ``PROVIDER_TEST_REDIS_URL`` when it is set (and then fails, never
skips, when that Redis is down), else a private ``redis-server`` started for the session.
Redis outlives the tests, so every test limits under its own random issuer: its own key
namespace. The outage test needs a Redis it may kill: a private ``redis-server`` on a free port,
killed and restarted on the same port.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from provider import config, errors
from provider.config import ConfigError, RateLimit
from provider.errors import TemporarilyUnavailable
from provider.ratelimit import Admission, Limiter, RateLimited, Verdict, key_prefix
from tests.servers import free_port

REDIS_URL = os.environ.get("PROVIDER_TEST_REDIS_URL")
REDIS_SERVER = shutil.which("redis-server")


class PrivateRedis:
    """A throwaway redis-server on a fixed free port, which a test may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER, "redis-server is not installed"
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """PROVIDER_TEST_REDIS_URL (must answer), or a private redis-server for the session."""
    if REDIS_URL:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            client.ping()  # down: this errors, and every Redis test with it
        finally:
            client.close()
        yield REDIS_URL
        return
    if not REDIS_SERVER:
        pytest.skip("neither PROVIDER_TEST_REDIS_URL nor redis-server is available")
    server = PrivateRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> str:
    """The limiter's redis_url: "" for in-process memory."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else ""


def settings(upstreams: dict[str, Any] | None = None, **rate_limits: Any) -> config.Settings:
    """Settings with small limits and a random issuer (a key namespace of its own)."""
    limits = {"token": "3/minute", "introspect": "3/minute", "failed_client_auth": "3/minute",
              "gateway": "3/minute", "suspend": {"gateway": "5/minute"}, **rate_limits}
    return config.load(overrides={
        "issuer": f"https://t{secrets.token_hex(6)}.example",
        "rate_limits": limits,
        "upstreams": upstreams or {"drive": {"base_url": "https://upstream.example/api"}},
    })


def token_call(limiter: Limiter, client_id: str) -> None:
    """A /token call of an authenticated client, as the endpoint counts it."""
    limiter.admit("192.0.2.100", client_id, "token").check()


def introspect_call(limiter: Limiter, client_id: str) -> None:
    limiter.admit("192.0.2.100", client_id, "introspect").check()


def admitted(limiter: Limiter, *args: Any) -> None:
    """``limiter.admit(*args)`` and its verdict."""
    limiter.admit(*args).check()


def refused(call, *args: Any) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        call(*args)
    return info.value


# -- /token and /introspect -----------------------------------------------------------------


def test_token_limit_then_429_with_retry_after(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for _ in range(3):
        token_call(limiter, "client-a")
    error = refused(token_call, limiter, "client-a")
    assert error.status_code == 429
    assert error.body()["error"] == "temporarily_unavailable"
    assert 1 <= int(error.headers["Retry-After"]) <= 60
    assert "/token" in error.description and "3/minute" in error.description
    assert "client-a" not in error.description
    token_call(limiter, "client-b")  # another client has its own count


def test_refusal_renders_as_rfc6749_json_with_retry_after(storage: str) -> None:
    limiter = Limiter(settings(token="1/minute"), storage)
    app = Flask(__name__)
    errors.init_app(app)

    @app.post("/token")
    def token():
        token_call(limiter, "client-a")
        return {"ok": True}

    client = app.test_client()
    assert client.post("/token").status_code == 200
    response = client.post("/token")
    assert response.status_code == 429
    assert response.get_json()["error"] == "temporarily_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Cache-Control"] == "no-store"


def test_a_verdict_that_failed_refuses_every_time_it_is_checked() -> None:
    """Read once, a verdict that failed (a lost reply, a bug) must not pass a second check."""
    def lost() -> None:
        raise ConnectionError("the reply was lost")

    admission = Admission(lost)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            admission.check()
    with pytest.raises(ConnectionError), admission:
        pass


def test_per_client_token_limit_overrides_the_default(storage: str) -> None:
    limiter = Limiter(settings(clients={"bulk": "5/minute", "tight": "1/minute"}), storage)
    for _ in range(5):
        token_call(limiter, "bulk")
    assert refused(token_call, limiter, "bulk").description.count("5/minute") == 1
    token_call(limiter, "tight")
    refused(token_call, limiter, "tight")
    for _ in range(3):
        token_call(limiter, "other")
    refused(token_call, limiter, "other")


def test_introspect_limit_is_separate_from_token(storage: str) -> None:
    limiter = Limiter(settings(introspect="2/minute"), storage)
    introspect_call(limiter, "rs")
    introspect_call(limiter, "rs")
    assert "/introspect" in refused(introspect_call, limiter, "rs").description
    token_call(limiter, "rs")


def test_retry_after_is_when_the_oldest_call_leaves_the_window(storage: str) -> None:
    limiter = Limiter(settings(token="1/second"), storage)
    token_call(limiter, "client-a")
    assert refused(token_call, limiter, "client-a").headers["Retry-After"] == "1"
    time.sleep(1.1)
    token_call(limiter, "client-a")


# -- failed client authentication -------------------------------------------------------------


def test_admitting_an_authenticated_client_counts_no_failure(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for _ in range(10):
        limiter.admit("192.0.2.1", "client-a").check()


def test_failed_auth_per_address(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for _ in range(3):  # failures of any client ids from one address
        limiter.admit("192.0.2.1", "client-a").check()
        limiter.record_failed_auth("192.0.2.1")
    for _ in range(2):  # then every attempt from that address, whoever it claims to be
        error = refused(admitted, limiter, "192.0.2.1", "client-a")
        assert "failed client authentications" in error.description
        assert "192.0.2.1" not in error.description
    limiter.admit("192.0.2.2", "client-a").check()  # another address is not refused


def test_failed_auth_per_client_id_from_one_address(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for _ in range(3):
        limiter.record_failed_auth("192.0.2.1")
    refused(admitted, limiter, "192.0.2.1", "client-a")
    # The client is not locked out from everywhere by one address's guesses.
    limiter.admit("192.0.2.9", "client-a").check()


def test_failed_auth_counts_an_ipv6_host_by_its_64(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for host in ("1", "2", "3"):
        limiter.record_failed_auth(f"2001:db8:1:2::{host}")
    refused(admitted, limiter, "2001:db8:1:2:ffff::4", "client-a")
    limiter.admit("2001:db8:1:3::1", "client-a").check()


def test_the_failure_that_crosses_the_limit_is_refused(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for _ in range(3):
        limiter.record_failed_auth("192.0.2.1")
    assert "failed client authentications" in refused(
        limiter.record_failed_auth, "192.0.2.1").description


def test_an_address_seen_closed_is_refused_before_authentication_without_asking_storage(
        storage: str) -> None:
    limiter = Limiter(settings(), storage)
    limiter.refuse_known_closed("192.0.2.1")  # nothing known yet
    for _ in range(3):
        limiter.record_failed_auth("192.0.2.1")
    limiter.refuse_known_closed("192.0.2.1")  # at the limit, not over it
    refused(limiter.record_failed_auth, "192.0.2.1")  # over: now known closed
    limiter.strategy = None  # any look-up from here on would fail
    error = refused(limiter.refuse_known_closed, "192.0.2.1")
    assert "failed client authentications" in error.description
    assert 1 <= int(error.headers["Retry-After"]) <= 60
    limiter.refuse_known_closed("192.0.2.2")


def test_an_address_admit_found_closed_is_known_closed(storage: str) -> None:
    shared = settings()
    limiter = Limiter(shared, storage)
    for _ in range(3):
        limiter.record_failed_auth("192.0.2.1")
    if storage:  # with Redis, learnt from another instance's failures too
        other = Limiter(shared, storage)
        refused(admitted, other, "192.0.2.1", "client-a", "token")
        refused(other.refuse_known_closed, "192.0.2.1")
    refused(admitted, limiter, "192.0.2.1", "client-a", None)
    refused(limiter.refuse_known_closed, "192.0.2.1")


def test_what_a_process_knows_closed_ends_with_the_window(storage: str) -> None:
    limiter = Limiter(settings(failed_client_auth="1/second"), storage)
    limiter.record_failed_auth("192.0.2.1")
    refused(limiter.record_failed_auth, "192.0.2.1")
    refused(limiter.refuse_known_closed, "192.0.2.1")
    time.sleep(1.1)
    limiter.refuse_known_closed("192.0.2.1")
    limiter.admit("192.0.2.1", "client-a", "token").check()


# -- admit: after authentication, the address and the endpoint's limit at once ----------------


def test_admit_refuses_a_closed_address_though_the_client_has_room(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for _ in range(3):
        limiter.record_failed_auth("192.0.2.1")
    for endpoint in ("token", "introspect", None):
        error = refused(admitted, limiter, "192.0.2.1", "client-a", endpoint)
        assert "failed client authentications" in error.description
        assert int(error.headers["Retry-After"]) >= 1
    limiter.admit("192.0.2.2", "client-a", "token").check()  # the client from elsewhere is let in


def test_admit_counts_in_the_endpoint_limit_of_the_client(storage: str) -> None:
    limiter = Limiter(settings(clients={"bulk": "5/minute"}), storage)
    limiter.admit("192.0.2.1", "client-a", "token").check()
    limiter.admit("192.0.2.5", "client-a", "token").check()  # one window, whichever the address
    limiter.admit("192.0.2.9", "client-a", "token").check()
    error = refused(admitted, limiter, "192.0.2.1", "client-a", "token")
    assert "/token" in error.description and "3/minute" in error.description
    for _ in range(3):
        limiter.admit("192.0.2.1", "client-a", "introspect").check()  # a limit of its own
    assert "/introspect" in refused(admitted, limiter, "192.0.2.1", "client-a", "introspect").description
    for _ in range(5):
        limiter.admit("192.0.2.1", "bulk", "token").check()  # the per-client override applies
    refused(admitted, limiter, "192.0.2.1", "bulk", "token")
    for _ in range(10):
        limiter.admit("192.0.2.1", "client-b", None).check()  # no endpoint: counts nothing


def test_admit_sees_failures_another_instance_counted(redis_url: str) -> None:
    shared = settings()
    first, second = Limiter(shared, redis_url), Limiter(shared, redis_url)
    for _ in range(3):
        first.record_failed_auth("192.0.2.1")
    refused(admitted, second, "192.0.2.1", "client-a", "token")  # refused, and counted
    second.admit("192.0.2.2", "client-a", "token").check()
    first.admit("192.0.2.2", "client-a", "token").check()
    refused(admitted, second, "192.0.2.2", "client-a", "token")  # the client's 4th, on either


def test_a_verdict_left_unread_is_never_read_as_the_next_ones(redis_url: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The count is sent before its verdict is read; a verdict a caller never read must not be
    taken for the next request's: the 4th call of 3 a minute is refused, not let in."""
    limiter = Limiter(settings(), redis_url)
    limiter.admit("192.0.2.1", "client-a", "token")  # counted, never read
    limiter.admit("192.0.2.1", "client-a", "token").check()
    limiter.admit("192.0.2.1", "client-a", "token").check()
    refused(admitted, limiter, "192.0.2.1", "client-a", "token")
    assert "never read" in caplog.text


def test_admit_reloads_its_scripts_when_redis_forgot_them(redis_url: str) -> None:
    limiter = Limiter(settings(), redis_url)
    limiter.admit("192.0.2.1", "client-a", "token").check()
    client = redis.Redis.from_url(redis_url)
    try:
        client.script_flush()
    finally:
        client.close()
    limiter.admit("192.0.2.1", "client-a", "token").check()
    limiter.admit("192.0.2.1", "client-a", "token").check()
    refused(admitted, limiter, "192.0.2.1", "client-a", "token")


# -- gateway ----------------------------------------------------------------------------------


def test_gateway_family_limit_then_suspension(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for call in range(3):  # a new connection each time: only the family is counted twice
        assert limiter.hit_gateway("family-1", f"conn-{call}", "drive") == Verdict()
    for call in (3, 4):  # beyond the plain limit: refused, and still counted for suspension
        error = refused(limiter.hit_gateway, "family-1", f"conn-{call}", "drive")
        assert "token family" in error.description and "family-1" not in error.description
    verdict = limiter.hit_gateway("family-1", "conn-5", "drive")
    assert verdict.suspend_family and not verdict.suspend_connection and verdict.suspend
    assert isinstance(verdict.refusal, RateLimited)
    assert int(verdict.refusal.headers["Retry-After"]) >= 1
    assert limiter.hit_gateway("family-2", "conn-6", "drive") == Verdict()


def test_gateway_connection_limit_defaults_to_the_gateway_limit(storage: str) -> None:
    limiter = Limiter(settings(), storage)
    for call in range(3):  # a new family each time: only the connection is counted twice
        limiter.hit_gateway(f"family-{call}", "conn-1", "drive")
    assert "connection" in refused(limiter.hit_gateway, "family-3", "conn-1", "drive").description
    refused(limiter.hit_gateway, "family-4", "conn-1", "drive")
    verdict = limiter.hit_gateway("family-5", "conn-1", "drive")
    assert verdict == Verdict(False, True, verdict.refusal) and verdict.refusal is not None


def test_gateway_connection_limit_from_the_upstream_config(storage: str) -> None:
    upstreams = {
        "drive": {"base_url": "https://drive.example/api", "rate_limit": "2/minute",
                  "suspend_rate_limit": "4/minute"},
        "mail": {"base_url": "https://mail.example/api"},
    }
    limiter = Limiter(settings(upstreams), storage)
    limiter.hit_gateway("f1", "drive-conn", "drive")
    limiter.hit_gateway("f2", "drive-conn", "drive")
    error = refused(limiter.hit_gateway, "f3", "drive-conn", "drive")
    assert "2/minute" in error.description
    refused(limiter.hit_gateway, "f4", "drive-conn", "drive")
    verdict = limiter.hit_gateway("f5", "drive-conn", "drive")
    assert verdict.suspend_connection and not verdict.suspend_family
    for family in ("g1", "g2", "g3"):  # mail keeps the defaults (3/minute)
        limiter.hit_gateway(family, "mail-conn", "mail")
    refused(limiter.hit_gateway, "g4", "mail-conn", "mail")


def test_suspension_is_reported_even_when_the_plain_limit_allows_the_call(storage: str) -> None:
    upstreams = {"drive": {"base_url": "https://drive.example/api", "suspend_rate_limit": "1/minute"}}
    limiter = Limiter(settings(upstreams), storage)
    assert limiter.hit_gateway("f1", "conn", "drive") == Verdict()
    assert limiter.hit_gateway("f2", "conn", "drive") == Verdict(False, True, None)


# -- several instances, one Redis ----------------------------------------------------------


def test_two_instances_on_one_redis_share_counts(redis_url: str) -> None:
    shared = settings()
    first, second = Limiter(shared, redis_url), Limiter(shared, redis_url)
    token_call(first, "client-a")
    token_call(second, "client-a")
    token_call(first, "client-a")
    refused(token_call, second, "client-a")
    first.record_failed_auth("192.0.2.1")
    second.record_failed_auth("192.0.2.1")
    first.record_failed_auth("192.0.2.1")
    refused(admitted, second, "192.0.2.1", "client-a")
    # Another deployment on the same Redis (another issuer) counts apart.
    token_call(Limiter(settings(), redis_url), "client-a")


def test_redis_keys_are_namespaced_and_hide_identifiers(redis_url: str) -> None:
    shared = settings()
    token_call(Limiter(shared, redis_url), "client-with-a-name")
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k.decode() for k in client.scan_iter(match=key_prefix(shared.issuer) + ":*")]
    finally:
        client.close()
    assert keys and all(k.startswith("provider:rl:") for k in keys)
    assert not any("client-with-a-name" in k for k in keys)


# -- Redis going away ---------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own, started, which the test may stop and start again."""
    if not REDIS_SERVER and not REDIS_URL:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_down_fails_closed_with_503_and_recovers(private_redis: PrivateRedis) -> None:
    server = private_redis
    limiter = Limiter(settings(), server.url)
    token_call(limiter, "client-a")
    server.stop()
    calls = [
        (token_call, (limiter, "client-a",)),
        (introspect_call, (limiter, "client-a",)),
        (limiter.admit, ("192.0.2.1", "client-a", "token")),
        (limiter.record_failed_auth, ("192.0.2.1",)),
        (limiter.hit_gateway, ("family", "conn", "drive")),
    ]
    for call, args in calls:
        with pytest.raises(TemporarilyUnavailable) as info:
            call(*args)
        assert info.value.status_code == 503
        assert info.value.body() == {"error": "temporarily_unavailable",
                                     "error_description": "rate limits cannot be checked right now"}
    server.start()  # same port: the instance recovers without a restart
    token_call(limiter, "client-a")
    limiter.admit("192.0.2.1", "client-a").check()
    assert limiter.hit_gateway("family", "conn", "drive") == Verdict()


def test_a_redis_restart_between_requests_costs_no_request(private_redis: PrivateRedis) -> None:
    server = private_redis
    limiter = Limiter(settings(), server.url)
    limiter.admit("192.0.2.1", "client-a", "token").check()  # loads the scripts
    limiter.admit("192.0.2.2", "client-b", "token").check()  # and leaves its connection open
    server.stop()
    server.start()  # the connection is dead; Redis has forgotten the scripts and counts
    for _ in range(3):
        limiter.admit("192.0.2.1", "client-a", "token").check()  # the first one: no 503
    refused(admitted, limiter, "192.0.2.1", "client-a", "token")


def test_a_forked_process_counts_on_its_own_connection(redis_url: str) -> None:
    limiter = Limiter(settings(), redis_url)
    limiter.admit("192.0.2.1", "client-a", "token").check()
    limiter.admit("192.0.2.1", "client-b", "token").check()  # the parent's connection is open now
    parents = limiter.storage._thread_connection()._sock.getsockname()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        try:
            limiter.admit("192.0.2.1", "client-a", "token").check()
            own = limiter.storage._thread_connection()._sock.getsockname()
            os._exit(0 if own != parents else 2)
        except BaseException:  # noqa: BLE001 - the child must exit, never return to pytest
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's call counted, on a socket of its own, and the parent's still answers.
    limiter.admit("192.0.2.1", "client-a", "token").check()  # the third of three
    refused(admitted, limiter, "192.0.2.1", "client-a", "token")
    assert limiter.storage._own.pid == os.getpid()


def test_redis_unreachable_from_the_start_is_503_not_a_crash() -> None:
    limiter = Limiter(settings(), f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(TemporarilyUnavailable):
        token_call(limiter, "client-a")


# -- configuration ------------------------------------------------------------------------


def load_toml(tmp_path: Any, text: str) -> config.Settings:
    path = tmp_path / "limits.toml"
    path.write_text(text)
    return config.load(str(path), environ={})


def test_config_per_client_and_per_upstream_limits(tmp_path: Any) -> None:
    loaded = load_toml(tmp_path, '''
[rate_limits.clients]
bulk = "60/minute"
"https://client.example/app" = "2/second"

[upstreams.drive]
base_url = "https://drive.example/api"
rate_limit = "100/minute"
suspend_rate_limit = "1000/hour"

[upstreams.mail]
base_url = "https://mail.example/api"
''')
    assert dict(loaded.rate_limits.clients) == {
        "bulk": RateLimit(60, 60), "https://client.example/app": RateLimit(2, 1)}
    assert loaded.upstreams["drive"].rate_limit == RateLimit(100, 60)
    assert loaded.upstreams["drive"].suspend_rate_limit == RateLimit(1000, 3600)
    assert loaded.upstreams["mail"].rate_limit is None
    assert loaded.upstreams["mail"].suspend_rate_limit is None
    assert config.load(environ={}).rate_limits.clients == ()


@pytest.mark.parametrize(("text", "message"), [
    ('[rate_limits.clients]\nbulk = "lots"\n', "rate_limits.clients.bulk must look like"),
    ('[rate_limits.clients]\nbulk = 60\n', "rate_limits.clients.bulk must look like"),
    ('[rate_limits]\nclients = "60/minute"\n', "rate_limits.clients must be a table"),
    ('[rate_limits.clients]\n"has space" = "1/minute"\n', "rate_limits.clients: 'has space'"),
    ('[upstreams.drive]\nbase_url = "https://d.example"\nrate_limit = "10/fortnight"\n',
     "upstreams.drive.rate_limit must look like"),
    ('[upstreams.drive]\nbase_url = "https://d.example"\nsuspend_rate_limit = 5\n',
     "upstreams.drive.suspend_rate_limit must look like"),
    ('[upstreams.drive]\nbase_url = "https://d.example"\nrate_limits = "1/minute"\n',
     "upstreams.drive.rate_limits is not a setting"),
])
def test_config_bad_limits_fail_naming_the_setting(tmp_path: Any, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path, text)
    assert str(info.value).startswith(message)


def test_default_file_with_the_examples_uncommented_loads(tmp_path: Any) -> None:
    text = config.DEFAULT_FILE
    for line in ('# [rate_limits.clients]', '# "batch-client"', "# [upstreams.drive]",
                 "# base_url", "# rate_limit", "# suspend_rate_limit"):
        text = text.replace(line, line[2:])
    loaded = load_toml(tmp_path, text)
    assert dict(loaded.rate_limits.clients) == {"batch-client": RateLimit(60, 60)}
    assert loaded.upstreams["drive"].rate_limit == RateLimit(600, 60)
