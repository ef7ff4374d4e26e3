"""The gateway: forward a call to an upstream with the vaulted credential, only within what the
presented token allows (THREATS.md, promise 11).

A call is authorised by a sequence of checks, each a refusal that never reaches the upstream:

1. this instance decrypts (role ``gateway`` or ``all``), else 503;
2. the upstream is declared, else 404;
3. the token comes in the ``Authorization`` header (RFC 6750 §2.1), never the query, else 401;
4. the token is valid and neither it nor an ancestor is revoked, else 401 ``invalid_token``; a
   DPoP-bound token comes with the ``DPoP`` scheme and a proof by its key (RFC 9449 §7), an
   unbound one as ``Bearer``;
5. its ``aud`` names this upstream's gateway resource, else 401 ``invalid_token``; from here
   on the call counts against the token family's and the connection's limits, refused or not
   (429 over the limit; over the suspension threshold the family or connection is revoked);
6. the raw path is unambiguous (no dot or empty segments, no encoded slash, backslash or dot),
   and a declared route matches the method and path, else 404;
7. the token's scope holds the route's scope, and its audience covers the exact URL, else 403
   ``insufficient_scope``;
8. the token derives from the subject's current connection to the upstream, else 401;
9. the caller's address is allowed for the token's client and the connection, else 403
   (the reason goes to the audit trail, not to the caller).

Then the caller's credentials, cookies, forwarding and hop-by-hop headers are dropped, the
upstream token is added, and the answer streams back without upstream cookies or challenges.
An expired upstream token is refreshed once, by one process at a time (a claim on the
connection row), and the decrypted credential is cached in this process only, for a minute.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provider import metrics
from provider.config import Route, Upstream
from provider.connections import address_allowed, gateway_resource, upstream_named
from provider.dpop import InvalidDPoPProofAtResource
from provider.errors import (
    AccessDenied,
    BadGateway,
    GatewayTimeout,
    InsufficientScope,
    InvalidToken,
    MissingToken,
    NotFound,
    TemporarilyUnavailable,
)
from provider.scopes import normalize_resource, resource_covers
from provider.tokens import TokenInvalid, audiences, verify_access_token
from provider.upstreams import UpstreamError, UpstreamTimeout, credential_from_token_response
from provider.vault import VaultError

if TYPE_CHECKING:
    import urllib3

    from provider.service import Provider

log = logging.getLogger("provider.gateway")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {
    "authorization", "cookie", "host", "content-length", "dpop", "forwarded", "via",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-prefix", "x-real-ip", "x-request-id",
    # Method overrides: an upstream that honours them would run a method no route allowed.
    "x-http-method-override", "x-method-override", "x-http-method"}
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"set-cookie", "www-authenticate", "server", "date"}
CREDENTIAL_CACHE_SECONDS = 60.0
CONNECTION_CACHE_SECONDS = 5.0
REFRESH_MARGIN = 5.0  # refresh an upstream token this many seconds before it expires
REFRESH_CLAIM_SECONDS = 15.0


@dataclass(frozen=True)
class Authorized:
    """A call that passed every check: where it goes and with what."""

    upstream: Upstream
    route: Route
    path: str
    claims: dict[str, Any]
    connection_id: str


@dataclass
class _Cached:
    version: int
    credential: dict[str, Any]
    loaded_at: float


def match_route(upstream: Upstream, method: str, path: str) -> Route | None:
    """The declared route for ``method`` and ``path``; ``{name}`` matches one whole segment."""
    segments = path.split("/")[1:]
    for route in upstream.routes:
        if route.method != method:
            continue
        template = route.path.split("/")[1:]
        if len(template) == len(segments) and all(
                (t.startswith("{") and s) or t == s for t, s in zip(template, segments, strict=True)):
            return route
    return None


class Gateway:
    def __init__(self, provider: Provider):
        self.provider = provider
        self._credentials: dict[str, _Cached] = {}
        self._connections: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # Authorisation ------------------------------------------------------------------------

    def authorize(self, *, upstream_name: str, method: str, raw_path: str,
                  authorization: str | None, query_args: Any, remote_addr: str | None,
                  dpop_proofs: list[str] | None = None) -> Authorized:
        provider, settings = self.provider, self.provider.settings
        if not provider.vault.can_open:
            raise TemporarilyUnavailable("this instance does not forward calls (role web)")
        upstream = upstream_named(provider, upstream_name)
        if "access_token" in query_args:
            raise InvalidToken("send the access token in the Authorization header, not the query")
        scheme, token = _presented_token(authorization)
        try:
            claims = verify_access_token(token, provider.keys, settings.issuer, settings.tokens.leeway)
        except TokenInvalid:
            raise InvalidToken("the access token is invalid") from None
        if provider.revocations.is_revoked(claims):
            raise InvalidToken("the access token is invalid")
        base = gateway_resource(settings.issuer, upstream.name)
        self._check_sender(scheme, token, claims, dpop_proofs or [], method, base + (raw_path or "/"))
        token_audiences = audiences(claims)
        if not any(resource_covers(base, aud) for aud in token_audiences):
            raise InvalidToken("the access token is not for this upstream")
        connection = self._connection(claims["sub"], upstream.name, claims["lineage"]["ids"])
        self._count(claims, connection, upstream.name)

        path = raw_path or "/"
        url = normalize_resource(base + path)
        route = match_route(upstream, method, path) if url == base + path else None
        if route is None:
            raise NotFound("no route of this upstream matches the method and path")
        if route.scope not in claims["scope"].split():
            raise InsufficientScope("the token's scope does not cover this route", route.scope)
        if not any(resource_covers(aud, url) for aud in token_audiences):
            raise InsufficientScope("the token's resource does not cover this path")

        if connection is None:
            raise InvalidToken("the access token grants no connection to this upstream")
        client = provider.clients.get(claims["client_id"])  # None for operator-minted tokens
        if (client is not None and not client.allows_address(remote_addr)) \
                or not address_allowed(connection["allowed_ips"], remote_addr):
            # The reason goes to the audit trail, never to the caller.
            provider.event("gateway.address_refused", client_id=claims["client_id"],
                           sub=claims["sub"], jti=claims["jti"], address=remote_addr,
                           connection_id=connection["connection_id"])
            raise AccessDenied()
        return Authorized(upstream, route, path, claims, connection["connection_id"])

    def _count(self, claims: dict[str, Any], connection: dict | None, upstream: str) -> None:
        """The circuit breakers: every call of a token family counts, refused or not; beyond the
        suspension threshold the family (or the connection) is revoked, with an alert."""
        ids = claims["lineage"]["ids"]
        family = ids[0] if ids else claims["jti"]
        connection_id = connection["connection_id"] if connection else "-"
        verdict = self.provider.limiter.hit_gateway(family, connection_id, upstream)
        if verdict.suspend_family:
            self.provider.suspend("family", family, "suspended: gateway calls over the limit")
        if verdict.suspend_connection and connection is not None:
            self.provider.suspend("connection", connection_id, "suspended: gateway calls over the limit")
        if verdict.refusal is not None:
            raise verdict.refusal

    def _check_sender(self, scheme: str, token: str, claims: dict[str, Any], proofs: list[str],
                      method: str, url: str) -> None:
        """RFC 9449 §7: a bound token only with the DPoP scheme and a proof by its key over this
        request; an unbound token only as a bearer token."""
        cnf = claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        if scheme == "bearer":
            if jkt is not None:
                raise InvalidToken("a DPoP-bound token needs the DPoP scheme and a proof")
            return
        if jkt is None:
            raise InvalidToken("the access token is not DPoP-bound")
        proof = self.provider.dpop.verify(proofs, method=method, url=url, access_token=token)
        if not hmac.compare_digest(proof.jkt, jkt):
            raise InvalidDPoPProofAtResource("the proof is not signed by the token's key")

    def _connection(self, subject: str, upstream: str, lineage_ids: list[str]) -> dict | None:
        """The subject's current connection, if the token derives from it. Rows are cached for
        a few seconds: a connection is never edited in place, and revoking one revokes the
        tokens derived from it, which step 4 sees at once."""
        key = (subject, upstream)
        cached = self._connections.get(key)
        if cached is None or time.monotonic() - cached[0] > CONNECTION_CACHE_SECONDS \
                or cached[1]["connection_id"] not in lineage_ids:
            row = self.provider.storage.find_connection(subject, upstream)
            if row is None:
                self._connections.pop(key, None)
                return None
            cached = (time.monotonic(), row)
            self._connections[key] = cached
        row = cached[1]
        return row if row["connection_id"] in lineage_ids else None

    # Credentials --------------------------------------------------------------------------

    def credential(self, connection_id: str, upstream: Upstream) -> tuple[int, dict[str, Any]]:
        """The decrypted credential (cached briefly in this process), refreshed if expired."""
        cached = self._credentials.get(connection_id)
        if cached is None or time.monotonic() - cached.loaded_at > CREDENTIAL_CACHE_SECONDS:
            cached = self._load(connection_id, upstream)
        expires_at = cached.credential.get("expires_at")
        if expires_at is not None and expires_at - REFRESH_MARGIN <= time.time():
            return self.refresh(connection_id, upstream, cached.version)
        return cached.version, cached.credential

    def _load(self, connection_id: str, upstream: Upstream) -> _Cached:
        row = self.provider.storage.get_connection(connection_id)
        if row is None:
            raise InvalidToken("the access token grants no connection to this upstream")
        try:
            plaintext = self.provider.vault.open(connection_id, upstream.name, row["ciphertext"])
        except VaultError:
            log.error("connection %s cannot be decrypted", connection_id)
            raise BadGateway("the stored credential cannot be used") from None
        cached = _Cached(row["version"], json.loads(plaintext), time.monotonic())
        self._credentials[connection_id] = cached
        self.provider.event("decryption", connection_id=connection_id, upstream=upstream.name)
        return cached

    def refresh(self, connection_id: str, upstream: Upstream, version: int) -> tuple[int, dict]:
        """Refresh the upstream token once, whichever process or thread asks first."""
        with self._lock_for(connection_id):
            cached = self._load(connection_id, upstream)
            if cached.version != version:  # someone else refreshed it meanwhile
                return cached.version, cached.credential
            storage = self.provider.storage
            if not storage.claim_connection_refresh(connection_id, version,
                                                    time.time() + REFRESH_CLAIM_SECONDS):
                return self._await_refresh(connection_id, upstream, version)
            previous = cached.credential
            if not previous.get("refresh_token"):
                storage.release_connection_refresh(connection_id)
                raise BadGateway("the upstream credential expired and cannot be refreshed")
            try:
                answer = self.provider.upstream_http.token(upstream, {
                    "grant_type": "refresh_token", "refresh_token": previous["refresh_token"]})
            except UpstreamError as exc:
                storage.release_connection_refresh(connection_id)
                log.warning("refreshing connection %s failed: %s", connection_id, exc)
                raise BadGateway("the upstream credential could not be refreshed") from None
            credential = credential_from_token_response(answer, previous)
            ciphertext = self.provider.vault.seal(
                connection_id, upstream.name, json.dumps(credential, separators=(",", ":")).encode())
            storage.reseal_connection(connection_id, version, ciphertext,
                                      credential.get("expires_at"))
            self._credentials[connection_id] = _Cached(version + 1, credential, time.monotonic())
            return version + 1, credential

    def _await_refresh(self, connection_id: str, upstream: Upstream, version: int) -> tuple[int, dict]:
        deadline = time.monotonic() + REFRESH_CLAIM_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)
            cached = self._load(connection_id, upstream)
            if cached.version != version:
                return cached.version, cached.credential
        raise BadGateway("the upstream credential could not be refreshed")

    def _lock_for(self, connection_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(connection_id, threading.Lock())

    # Forwarding ---------------------------------------------------------------------------

    def forward(self, call: Authorized, *, method: str, query: str, headers: list[tuple[str, str]],
                body: Any, body_replayable: bool) -> urllib3.BaseHTTPResponse:
        """Send the call upstream; an upstream 401 refreshes the credential and retries once."""
        url = call.upstream.base_url + call.path + (f"?{query}" if query else "")
        forwarded = upstream_headers(headers)
        version, credential = self.credential(call.connection_id, call.upstream)
        response = self._send(call.upstream.name, method, url, forwarded, credential, body)
        if response.status == 401 and body_replayable and credential.get("refresh_token"):
            response.drain_conn()
            response.release_conn()
            version, credential = self.refresh(call.connection_id, call.upstream, version)
            response = self._send(call.upstream.name, method, url, forwarded, credential, body)
        if response.status == 401:
            response.drain_conn()
            response.release_conn()
            raise BadGateway("the upstream refused the stored credential")
        return response

    def _send(self, upstream: str, method: str, url: str, headers: dict[str, str],
              credential: dict[str, Any], body: Any) -> urllib3.BaseHTTPResponse:
        headers = {**headers, "Authorization": f"Bearer {credential['access_token']}"}
        started = time.perf_counter()
        try:
            response = self.provider.upstream_http.request(method, url, headers=headers, body=body)
            metrics.GATEWAY_UPSTREAM_SECONDS.labels(upstream).observe(time.perf_counter() - started)
            return response
        except UpstreamTimeout:
            raise GatewayTimeout() from None
        except UpstreamError as exc:
            log.warning("gateway call to %s failed: %s", url.split("?")[0], exc)
            raise BadGateway() from None


def _presented_token(authorization: str | None) -> tuple[str, str]:
    """The scheme (``bearer`` or ``dpop``) and the token of the Authorization header."""
    if not authorization:
        raise MissingToken()
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() not in ("bearer", "dpop") or not token.strip():
        raise MissingToken("the Authorization header must carry a Bearer or DPoP token")
    return scheme.lower(), token.strip()


def upstream_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The caller's headers minus credentials, hop-by-hop and forwarding headers (and any the
    caller's ``Connection`` header names, RFC 9110 §7.6.1)."""
    named = {n.strip().lower() for k, v in headers if k.lower() == "connection" for n in v.split(",")}
    return {k: v for k, v in headers if k.lower() not in DROPPED_REQUEST_HEADERS | named}


def downstream_headers(headers: Any) -> list[tuple[str, str]]:
    """The upstream's answer headers minus hop-by-hop headers, cookies and challenges."""
    named = {n.strip().lower() for n in headers.get("Connection", "").split(",") if n.strip()}
    return [(k, v) for k, v in headers.items() if k.lower() not in DROPPED_RESPONSE_HEADERS | named]
