"""Rate limits as circuit breakers, counted by the :pypi:`limits` library.

Four kinds of limit (``[rate_limits]`` in the config):

- ``/token`` and ``/introspect`` calls per client (``token`` may be overridden per client in
  ``[rate_limits.clients]``);
- failed client authentications per source address (an IPv6 address counts as its /64), and
  per client id from one address (``failed_client_auth``). Every failure counts, and the one
  that crosses the limit is answered 429. A client that authenticates is refused too while
  its address is over: checked after authenticating, in the same round trip to Redis as the
  endpoint's own limit (:meth:`Limiter.admit`), so the hot path pays one Redis call, not two.
  A process that has seen an address closed refuses it before authenticating, until its
  window reopens (:meth:`Limiter.refuse_known_closed`): whether a refused request's
  credentials were right is told neither by the answer nor by its timing;
- gateway calls per token family (``gateway``) and per connection (the upstream's
  ``rate_limit``, default ``gateway``).

Exceeding one raises :class:`RateLimited` (429, ``Retry-After``). Gateway calls are also
counted against a second, higher threshold (``[rate_limits.suspend].gateway``, and the
upstream's ``suspend_rate_limit``): every call counts there, refused or not, and crossing it
returns a :class:`Verdict` telling the caller to suspend the family or the connection (revoke,
alert). That is the circuit breaker for a stolen token that is siphoning data.

Counting uses the ``limits`` moving-window strategy: exact ("at most N in any span of the
period", no burst of 2N at a fixed window's edge) and it gives the time the oldest counted call
leaves the window, which is exactly when the next one is allowed: the ``Retry-After``. Storage
is in-process memory without a Redis URL (each process counts alone) or Redis with one (every
instance sharing the Redis shares the counts), under the key prefix ``provider:rl:<hash of the
issuer>`` so that deployments sharing one Redis do not count each other's calls. Identifiers
(client ids, addresses, family and connection ids) are hashed into the keys: an attacker
choosing a client id cannot choose key length or content.

Fail closed: when the counts cannot be read or written (Redis down, timing out, refusing), every
check raises :class:`provider.errors.TemporarilyUnavailable` (503); nothing is let through
uncounted. The Redis client is built without long retry loops, so a check fails within about
the socket timeout, and the next check after Redis returns simply works again.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis
import redis.exceptions
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.errors import ConcurrentUpdateError, StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from provider.config import RateLimit, Settings
from provider.errors import OAuthError, TemporarilyUnavailable

log = logging.getLogger("provider.ratelimit")

_FAILED_AUTH = "the limit on failed client authentications from this address"
_MAX_KNOWN_CLOSED = 10000  # addresses a process remembers as closed
REDIS_SOCKET_TIMEOUT = 1.0
"""Seconds a Redis command may take before the check fails closed."""

_ITEMS: dict[int, type[RateLimitItem]] = {
    1: RateLimitItemPerSecond,
    60: RateLimitItemPerMinute,
    3600: RateLimitItemPerHour,
}
_STORAGE_ERRORS = (StorageError, ConcurrentUpdateError, redis.exceptions.RedisError, OSError)


class RateLimited(OAuthError):
    """429 Too Many Requests (RFC 6585 §4) with ``Retry-After`` (RFC 9110 §10.2.3).

    The error code is RFC 6749 §4.1.2.1's ``temporarily_unavailable``: "The authorization
    server is currently unable to handle the request due to a temporary overloading ...". The
    description says which limit was hit, never whose (no client id, address or token id).
    """

    error = "temporarily_unavailable"
    status_code = 429
    default_description = "too many requests"

    def __init__(self, description: str | None = None, retry_after: int = 1):
        self.retry_after = max(1, int(retry_after))
        super().__init__(description, {"Retry-After": str(self.retry_after)})


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Limiter.hit_gateway` found, for a call it did not refuse by raising.

    ``suspend_family`` / ``suspend_connection``: that suspension threshold is crossed; the
    caller revokes the family (the lineage's root ids) or the connection with a reason, records
    an alert and sends it. ``refusal``: when set, the caller must not forward the call and
    raises it once the suspension is done (a call crossing a suspension threshold has normally
    exceeded the plain limit too).
    """

    suspend_family: bool = False
    suspend_connection: bool = False
    refusal: RateLimited | None = None

    @property
    def suspend(self) -> bool:
        return self.suspend_family or self.suspend_connection


class Admission:
    """The limiter's verdict on one request, perhaps still on its way from Redis.

    :meth:`check` waits for it (once) and raises the refusal (429, or 503 when the counts
    cannot be read). The request may do work without effects before checking: parse, verify
    signatures, look things up; it must check before anything with an effect (a token issued,
    a proof or code spent, an event recorded). Used as a context manager, the admission is
    checked on the way out whatever happens in the block, and a refusal then replaces the
    block's own error, so that a request over its limit is answered 429 whatever else is
    wrong with it, as if it had been checked first.
    """

    __slots__ = ("_refusal", "_verdict")
    ADMITTED: ClassVar[Admission]

    def __init__(self, verdict: Callable[[], None] | None):
        self._verdict = verdict  # None once known
        self._refusal: Exception | None = None

    @classmethod
    def refused(cls, refusal: OAuthError) -> Admission:
        admission = cls(None)
        admission._refusal = refusal
        return admission

    def check(self) -> None:
        if self._verdict is not None:
            verdict, self._verdict = self._verdict, None
            try:
                verdict()
            except Exception as refusal:  # noqa: BLE001 - any failure refuses, every time
                self._refusal = refusal
        if self._refusal is not None:
            raise self._refusal

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if exc is None or exc is not self._refusal:  # not the refusal itself, raised within
            self.check()


Admission.ADMITTED = Admission(None)


def _item(limit: RateLimit, namespace: str) -> RateLimitItem:
    return _ITEMS[limit.period](limit.count, namespace=namespace)


@functools.lru_cache(maxsize=65536)
def _key(value: str) -> str:
    """A fixed-length key part for ``value``: it may be long or attacker-chosen."""
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=65536)
def _address(address: str) -> str:
    """The source a failed-authentication limit counts: an IPv4 address, or an IPv6 address's
    /64 (one host usually holds a whole /64, and would otherwise have 2**64 allowances)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return _key(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return _key(str(ipaddress.IPv6Network((ip, 64), strict=False)))
    return _key(str(ip))


class _MemoryStorage(MemoryStorage):
    """``limits``' in-process storage, cleaning out expired entries once a second.

    The stock storage restarts a 10 ms ``threading.Timer`` after every hit whose previous timer
    has run: under load, a thread start for about every tenth request (measured in the bench's
    profile). Counts are read against the clock, so cleaning less often only keeps expired
    entries in memory a little longer. If a release of ``limits`` renames the hook, this
    override is simply not called and the stock behaviour remains.
    """

    CLEANUP_INTERVAL = 1.0

    def _MemoryStorage__schedule_expiry(self) -> None:
        if not self.timer.is_alive():
            self.timer = threading.Timer(self.CLEANUP_INTERVAL, self._MemoryStorage__expire_events)
            self.timer.daemon = True
            self.timer.start()


def key_prefix(issuer: str) -> str:
    return "provider:rl:" + hashlib.sha256(issuer.encode("utf-8")).hexdigest()[:16]


class _RedisStorage(RedisStorage):
    """``limits``' Redis storage, with one more operation: :meth:`send_test_and_acquire`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._own = threading.local()  # each thread's connection for send_test_and_acquire

    def send_test_and_acquire(self, window: tuple[str, int, int],
                              acquire: tuple[str, int, int]) -> Callable[[], tuple[bool, bool]]:
        """Send, and return the function that reads: whether the moving window ``window`` (key,
        limit, expiry) has room for one more, and whether one entry was acquired in
        ``acquire``. The same two scripts as :meth:`get_moving_window` and
        :meth:`acquire_entry`, with the same arguments, sent together (one round trip instead
        of two). The caller may work while Redis answers; this thread's next command reads the
        replies first if the caller never did (see :meth:`_send`)."""
        window_key, window_limit, window_expiry = window
        key, limit, expiry = acquire
        now = time.time()
        # EVALSHA directly: a Script object first asks SCRIPT EXISTS, one more round trip.
        # Redis knows the scripts after their first use through ``limits``; until then (and
        # after a restart) the fallback below runs them that way, loading them.
        commands = (
            ("EVALSHA", self.lua_moving_window.sha, 1, self.prefixed_key(window_key),
             now - window_expiry, window_limit),
            ("EVALSHA", self.lua_acquire_moving_window.sha, 1, self.prefixed_key(key),
             now, limit, expiry, 1),
        )
        try:
            replies = self._send(commands)
        except self.base_exceptions as exc:
            raise StorageError(exc) from exc

        def read() -> tuple[bool, bool]:
            try:
                window_state, acquired = replies()
            except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
                counted = self.get_moving_window(window_key, window_limit, window_expiry)[1]
                return counted <= window_limit - 1, self.acquire_entry(key, limit, expiry)
            except self.base_exceptions as exc:
                raise StorageError(exc) from exc
            counted = int(window_state[1]) if window_state else 0
            return counted <= window_limit - 1, bool(acquired)

        return read

    def _send(self, commands: tuple[tuple[Any, ...], ...]) -> Callable[[], list[Any]]:
        """Send ``commands`` at once on this thread's own connection, and return the function
        that reads their replies (once; later calls return the same).

        Not a redis-py pipeline, nor the pool: on the hot path of every ``/token`` and
        ``/introspect`` call, their bookkeeping cost two thirds as much CPU again as the round
        trip itself (65 against 43 µs per call, measured on the bench's machine). The
        connection is made with the pool's settings (timeouts, address, credentials). Replies
        still unread from this thread's previous send are read (and dropped) first, so that no
        reply is ever taken for another command's."""
        own = self._own
        connection = self._thread_connection()
        if own.unread is not None:
            log.error("a rate-limit verdict was never read; reading it now")
            own.unread()
        packed = connection.pack_commands(commands)
        resent = False
        try:
            _send(connection, packed)
        except redis.exceptions.ConnectionError:  # dropped by Redis (a restart): reconnect once
            resent = True
            _send(connection, packed)
        result: list[Any] = []

        def replies() -> list[Any]:
            if own.unread is not replies:
                return result
            own.unread = None
            try:
                result.extend(_read(connection, len(commands)))
            except redis.exceptions.ConnectionError:
                if resent:
                    raise
                _send(connection, packed)  # dropped since the last request: once more, anew
                result.extend(_read(connection, len(commands)))
            return result

        own.unread = replies
        return replies

    def _thread_connection(self) -> redis.Connection:
        own = self._own
        pid = os.getpid()
        if getattr(own, "pid", None) != pid:  # first use in this thread, or a forked child
            pool = self.get_connection().connection_pool
            own.connection, own.pid = pool.connection_class(**pool.connection_kwargs), pid
            own.unread = None
        return own.connection


def _send(connection: redis.Connection, packed: list[bytes]) -> None:
    try:
        connection.send_packed_command(packed, check_health=False)
    except BaseException:
        connection.disconnect()
        raise


def _read(connection: redis.Connection, replies: int) -> list[Any]:
    """Read ``replies`` replies (an error reply raises). Any failure closes the connection, so
    that no reply is ever left unread for the next caller; the next send opens a new one."""
    try:
        return [connection.read_response() for _ in range(replies)]
    except BaseException:
        connection.disconnect()
        raise


def _redis_storage(redis_url: str, prefix: str) -> RedisStorage:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    scheme = urlsplit(redis_url).scheme
    if scheme == "unix":  # limits spells a Unix socket redis+unix://
        redis_url = "redis+unix" + redis_url[len("unix"):]
    return _RedisStorage(
        redis_url,
        key_prefix=prefix,
        wrap_exceptions=True,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
        # One immediate retry replaces a pooled connection Redis dropped (a restart);
        # redis-py's default of ten backed-off retries would hold a request for seconds.
        retry=Retry(NoBackoff(), 1),
    )


class Limiter:
    def __init__(self, settings: Settings, redis_url: str = ""):
        limits = settings.rate_limits
        self.storage: Storage = (
            _redis_storage(redis_url, key_prefix(settings.issuer)) if redis_url else _MemoryStorage()
        )
        self.strategy = MovingWindowRateLimiter(self.storage)
        self._token = _item(limits.token, "token")
        self._token_clients = {
            client_id: _item(limit, "token") for client_id, limit in limits.clients
        }
        self._introspect = _item(limits.introspect, "introspect")
        self._failed_address = _item(limits.failed_client_auth, "auth-addr")
        self._family = _item(limits.gateway, "gw-family")
        self._family_suspend = _item(limits.suspend_gateway, "gw-family-suspend")
        self._connection: dict[str, tuple[RateLimitItem, RateLimitItem]] = {
            name: (
                _item(upstream.rate_limit or limits.gateway, "gw-conn"),
                _item(upstream.suspend_rate_limit or limits.suspend_gateway, "gw-conn-suspend"),
            )
            for name, upstream in settings.upstreams.items()
        }
        self._default_connection = (
            _item(limits.gateway, "gw-conn"), _item(limits.suspend_gateway, "gw-conn-suspend"))
        self._failing = False
        self._failing_lock = threading.Lock()
        self._closed: dict[str, float] = {}  # address key -> monotonic time it may retry

    def after_fork(self) -> None:
        """Give a forked worker fresh in-process counts (redis-py reconnects by itself)."""
        self._closed = {}
        if isinstance(self.storage, MemoryStorage):
            self.storage = _MemoryStorage()
            self.strategy = MovingWindowRateLimiter(self.storage)

    def refuse_known_closed(self, address: str) -> None:
        """Before authenticating: refuse an address this process has seen over its
        failed-authentication limit, without looking at its credentials or asking the
        storage. Only the first request from a closed address in each process goes on to
        authenticate (and is refused alike, right credentials or wrong): no stream of timings
        can tell a guesser which of its guesses was right."""
        identifier = _address(address)
        until = self._closed.get(identifier)
        if until is None:
            return
        remaining = until - time.monotonic()
        if remaining <= 0:
            self._closed.pop(identifier, None)
            return
        raise RateLimited(_describe_refusal(_FAILED_AUTH, self._failed_address),
                          math.ceil(remaining))

    # -- the checks -------------------------------------------------------------------------

    def admit(self, address: str, client_id: str, endpoint: str | None = None) -> Admission:
        """After ``client_id`` authenticated from ``address``: refuse the request if the address
        is over its failed-authentication limit (right credentials or not), and count it
        against the client's limit for ``endpoint`` ("token", "introspect", or None for
        none). With Redis, both in one round trip; a refused request still counts.

        The verdict is the returned :class:`Admission`'s: with Redis it may still be on its
        way, and the caller may meanwhile do work without effects (parse, verify signatures)
        until :meth:`Admission.check`."""
        identifier = _address(address)
        limit = self._endpoint_limit(endpoint, client_id) if endpoint is not None else None
        if limit is not None and isinstance(self.storage, _RedisStorage):
            item, key, _ = limit
            window = (self._failed_address.key_for(identifier), self._failed_address.amount,
                      self._failed_address.get_expiry())
            with self._guard():
                read = self.storage.send_test_and_acquire(
                    window, (item.key_for(key), item.amount, item.get_expiry()))

            def verdict() -> None:
                with self._guard():
                    self._judge(identifier, limit, *read())

            return Admission(verdict)
        try:
            with self._guard():
                address_open = self.strategy.test(self._failed_address, identifier)
                admitted = limit is None or self.strategy.hit(limit[0], limit[1])
                self._judge(identifier, limit, address_open, admitted)
        except OAuthError as refusal:
            return Admission.refused(refusal)
        return Admission.ADMITTED

    def _judge(self, identifier: str, limit: tuple[RateLimitItem, str, str] | None,
               address_open: bool, admitted: bool) -> None:
        """Raise the refusal, if any: the closed address first, then the endpoint's limit."""
        if not address_open:
            raise self._closed_address(identifier)
        if not admitted and limit is not None:
            item, key, what = limit
            raise self._refusal(item, (key,), what)

    def _endpoint_limit(self, endpoint: str, client_id: str) -> tuple[RateLimitItem, str, str]:
        """The limit, key and description of ``client_id``'s calls to ``endpoint``."""
        item = (self._token_clients.get(client_id, self._token) if endpoint == "token"
                else self._introspect)
        return item, _key(client_id), f"the /{endpoint} rate limit of this client"

    def record_failed_auth(self, address: str) -> None:
        """After a failed authentication: one more for the address; 429 once it is over.

        One counter serves both limits of the contract ("per source address, and per client id
        from one address"): every failure counts for its address, so the failures of any one
        client id from an address never outnumber the address's own, and both limits are the
        same ``failed_client_auth``. A second counter would cost a look-up per request (a
        Redis round trip on a shared deployment) and could never refuse anything more."""
        identifier = _address(address)
        with self._guard():
            if not self.strategy.hit(self._failed_address, identifier):
                raise self._closed_address(identifier)

    def hit_gateway(self, family: str, connection_id: str, upstream: str) -> Verdict:
        """Count one gateway call for the token family and for the connection.

        Raises :class:`RateLimited` when a plain limit is exceeded and no suspension threshold
        is crossed. When one is crossed, returns the verdict instead, with ``refusal`` set if
        the plain limit refused the call too: the caller suspends, then raises the refusal.
        """
        family_key, connection_key = _key(family), _key(connection_id)
        connection_item, connection_suspend = self._connection.get(
            upstream, self._default_connection)
        with self._guard():
            # Every call counts towards suspension, whether the plain limit refuses it or not.
            suspend_family = not self.strategy.hit(self._family_suspend, family_key)
            suspend_connection = not self.strategy.hit(connection_suspend, connection_key)
            refusal = None
            if not self.strategy.hit(self._family, family_key):
                refusal = self._refusal(self._family, (family_key,),
                                        "the gateway rate limit of this token family")
            elif not self.strategy.hit(connection_item, connection_key):
                refusal = self._refusal(connection_item, (connection_key,),
                                        "the gateway rate limit of this connection")
        if suspend_family or suspend_connection:
            return Verdict(suspend_family, suspend_connection, refusal)
        if refusal is not None:
            raise refusal
        return Verdict()

    # -- helpers ----------------------------------------------------------------------------

    def _refusal(self, item: RateLimitItem, identifiers: tuple[str, ...], what: str) -> RateLimited:
        reset = self.strategy.get_window_stats(item, *identifiers).reset_time
        retry_after = max(1, math.ceil(reset - time.time()))
        return RateLimited(_describe_refusal(what, item), retry_after)

    def _closed_address(self, identifier: str) -> RateLimited:
        """The refusal for an address over its failed-authentication limit, remembered in this
        process until the window lets it in again (see :meth:`refuse_known_closed`)."""
        refusal = self._refusal(self._failed_address, (identifier,), _FAILED_AUTH)
        if len(self._closed) >= _MAX_KNOWN_CLOSED:
            now = time.monotonic()
            self._closed = {k: t for k, t in self._closed.items() if t > now}
            if len(self._closed) >= _MAX_KNOWN_CLOSED:
                self._closed.clear()  # a flood of addresses: forget, and ask the storage again
        self._closed[identifier] = time.monotonic() + refusal.retry_after
        return refusal

    def _guard(self) -> _Guard:
        return _Guard(self)

    def _storage_failed(self, exc: BaseException) -> None:
        cause = getattr(exc, "storage_error", None) or exc
        with self._failing_lock:
            first, self._failing = not self._failing, True
        if first:
            log.warning("rate limits cannot be checked (%s: %s); refusing requests until the "
                        "storage answers again", type(cause).__name__, cause)

    def _storage_answered(self) -> None:
        if self._failing:
            with self._failing_lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.warning("rate limit storage answers again")


class _Guard:
    """Turns a storage failure inside the block into a 503, and logs outages once."""

    def __init__(self, limiter: Limiter):
        self.limiter = limiter

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, RateLimited):
            self.limiter._storage_answered()
            return False
        if isinstance(exc, _STORAGE_ERRORS):
            self.limiter._storage_failed(exc)
            raise TemporarilyUnavailable("rate limits cannot be checked right now") from None
        return False


def _describe_refusal(what: str, item: RateLimitItem) -> str:
    return f"rate limited: {what} ({_describe(item)}) is exceeded; retry later"


def _describe(item: RateLimitItem) -> str:
    unit = {1: "second", 60: "minute", 3600: "hour"}[item.get_expiry()]
    return f"{item.amount}/{unit}"


class NoLimits:
    """The limiter when ``rate_limits.enabled = false``: counts nothing, refuses nothing."""

    def after_fork(self) -> None:
        pass

    def refuse_known_closed(self, address: str) -> None:
        pass

    def admit(self, address: str, client_id: str, endpoint: str | None = None) -> Admission:
        return Admission.ADMITTED

    def record_failed_auth(self, address: str) -> None:
        pass

    def hit_gateway(self, family: str, connection_id: str, upstream: str) -> Verdict:
        return Verdict()
