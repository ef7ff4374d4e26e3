"""A fake third-party upstream: an OAuth 2.0 authorization server plus an API, on loopback.

:class:`FakeUpstream` plays the service whose users' tokens the provider vaults. It runs a real
HTTP server (werkzeug, threaded) on ``127.0.0.1`` and a random port, so the provider's tests go
through real sockets, redirects, chunked bodies and timeouts:

``GET /authorize``
    Authorization endpoint (RFC 6749 §4.1, PKCE S256 required, RFC 7636). The "user" consents at
    once: 302 back to ``redirect_uri`` with ``code`` and ``state`` (``error=access_denied`` when
    :attr:`FakeUpstream.deny_consent` is set). Malformed requests get 400 JSON and no redirect.
``POST /token``
    Token endpoint with HTTP Basic client authentication: ``authorization_code`` (code single use,
    60 s, bound to redirect_uri and the PKCE challenge) and ``refresh_token`` (rotating: a refresh
    token works once). Every posted form is kept in :attr:`FakeUpstream.token_requests`.
``/api/<path>`` (GET, HEAD, POST, PUT, PATCH, DELETE)
    The API. Every request is recorded *before* authentication in :attr:`FakeUpstream.requests`,
    with the raw path as it arrived on the wire. It then requires ``Authorization: Bearer <token>``
    with a live upstream access token. ``/api/stream/<n>`` streams ``n`` KiB in 1 KiB chunks
    without a Content-Length, ``/api/big/<n>`` answers ``n`` bytes at once (see
    :func:`stream_body` and :func:`big_body` for the exact bytes), ``/api/echo`` answers the
    request body back; any other path answers ``{"ok": true, "method", "path", "query"}``.

Use it as ``with FakeUpstream().start() as fake: ...`` or through the ``upstream`` fixture
(``tests/conftest.py``). It needs only what ``make run`` installs: the README's worked example
runs it with ``python -m tests.upstream``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

KIB = 1024
CODE_LIFETIME = 60.0
API_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
# RFC 7636 §4.1/§4.2: code_verifier and code_challenge are 43-128 unreserved characters.
_PKCE_VALUE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


@dataclass
class Recorded:
    """One request that reached ``/api/*``, exactly as it arrived.

    ``path`` is the raw request path (percent-encoding untouched, query removed), ``query`` the
    raw query string (``""`` when none), ``headers`` every request header (as the WSGI server
    presents them: ``Title-Case`` names, repeated headers joined), ``body`` the request body.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None when it was not sent."""
        wanted = name.lower()
        return next((value for key, value in self.headers.items() if key.lower() == wanted), None)


@dataclass
class _PendingCode:
    """What /authorize bound an authorization code to."""

    redirect_uri: str
    code_challenge: str
    scope: str
    expires_at: float


def stream_body(kib: int) -> bytes:
    """The exact body of ``/api/stream/<kib>``: chunk ``i`` is 1024 copies of ``"abc…z"[i % 26]``."""
    return b"".join(_stream_chunks(kib))


def big_body(size: int) -> bytes:
    """The exact body of ``/api/big/<size>``: ``b"0123456789"`` repeated, cut to ``size`` bytes."""
    return (b"0123456789" * (size // 10 + 1))[:size]


def _stream_chunks(kib: int) -> Iterator[bytes]:
    for index in range(kib):
        yield bytes([ord("a") + index % 26]) * KIB


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of ``verifier``: BASE64URL(SHA256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def pkce() -> tuple[str, str]:
    """A fresh PKCE code verifier and its S256 challenge (RFC 7636 §4.1-4.2)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status=status, headers=headers, mimetype="application/json")


def _oauth_error(status: int, error: str, description: str,
                 headers: dict[str, str] | None = None) -> Response:
    """An RFC 6749 §5.2 error response (never cached)."""
    return _json({"error": error, "error_description": description}, status,
                 {"Cache-Control": "no-store", "Pragma": "no-cache", **(headers or {})})


def _raw_path_and_query(environ: dict[str, Any]) -> tuple[str, str]:
    """The request target as received on the wire, split into path and query.

    werkzeug's server puts the untouched target in ``RAW_URI``/``REQUEST_URI``; without them
    (e.g. werkzeug's test client) fall back to the decoded ``SCRIPT_NAME + PATH_INFO``.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        return path, environ.get("QUERY_STRING", "")
    if not raw.startswith("/"):  # absolute-form target ("http://host/path?query")
        parts = urlsplit(raw)
        raw = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    path, _, query = raw.partition("?")
    return path, query


class FakeUpstream:
    """A third-party OAuth server and API on 127.0.0.1:<random port>, served by werkzeug in a thread.

    All state sits behind one lock, so the threaded server and the test thread can use it at once.
    The knobs (:attr:`deny_consent`, :attr:`token_endpoint_fails`, :attr:`access_token_lifetime`,
    :attr:`api_delay`) may be changed while the server runs; they apply to the next request.
    """

    client_id: str
    client_secret: str
    requests: list[Recorded]
    token_requests: list[dict[str, str]]
    deny_consent: bool
    token_endpoint_fails: bool
    access_token_lifetime: int
    api_delay: float

    def __init__(self, *, client_id: str = "provider-at-upstream", client_secret: str = "upstream-secret",
                 access_token_lifetime: int = 3600) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.requests = []
        self.token_requests = []
        self.deny_consent = False
        self.token_endpoint_fails = False
        self.access_token_lifetime = access_token_lifetime
        self.api_delay = 0.0
        self._lock = threading.Lock()
        self._codes: dict[str, _PendingCode] = {}
        self._access_tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._refresh_tokens: dict[str, str] = {}  # live (unused) refresh token -> granted scope
        self._stopping = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeUpstream:
        """Start serving on a loopback port (random by default; no-op when already running)."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = make_server("127.0.0.1", port, self.wsgi_app, threaded=True)
        self._server = server
        self._url = f"http://127.0.0.1:{server.server_port}"
        # A short poll interval keeps stop() fast (the default makes shutdown wait up to 0.5 s).
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-upstream-{server.server_port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket; wakes requests sleeping in ``api_delay``."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # --- addresses -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's origin, e.g. ``http://127.0.0.1:54321`` (only once started)."""
        if self._url is None:
            raise RuntimeError("FakeUpstream is not started")
        return self._url

    @property
    def base_url(self) -> str:
        """Where the API lives: ``url + "/api"``."""
        return self.url + "/api"

    @property
    def authorize_url(self) -> str:
        """The authorization endpoint: ``url + "/authorize"``."""
        return self.url + "/authorize"

    @property
    def token_url(self) -> str:
        """The token endpoint: ``url + "/token"``."""
        return self.url + "/token"

    # --- token state ---------------------------------------------------------------------------

    def config_table(self, name: str = "drive") -> str:
        """The provider's ``[upstreams.<name>]`` table for this upstream: one route,
        ``GET /files/{id}``, needing the internal scope ``files:read``."""
        return f"""
[upstreams.{name}]
base_url = "{self.base_url}"
authorize_url = "{self.authorize_url}"
token_url = "{self.token_url}"
client_id = "{self.client_id}"
client_secret = "{self.client_secret}"
scopes = ["files.read"]
[[upstreams.{name}.routes]]
method = "GET"
path = "/files/{{id}}"
scope = "files:read"
"""

    def issue_tokens(self, expires_in: int | None = None, *, scope: str = "read write") -> dict[str, Any]:
        """Mint a live access/refresh token pair directly, as /token would answer it.

        ``expires_in`` defaults to :attr:`access_token_lifetime`; 0 or less mints an access
        token that is already expired (its refresh token still works).
        """
        with self._lock:
            return self._mint(scope, self.access_token_lifetime if expires_in is None else expires_in)

    def expire(self, access_token: str) -> None:
        """Make ``access_token`` invalid from now on: the API answers 401 to it."""
        with self._lock:
            self._access_tokens.pop(access_token, None)

    def valid_access_tokens(self) -> set[str]:
        """The access tokens the API currently accepts."""
        now = time.monotonic()
        with self._lock:
            return {token for token, expires_at in self._access_tokens.items() if expires_at > now}

    def valid_refresh_tokens(self) -> set[str]:
        """The refresh tokens /token currently accepts (each one works once)."""
        with self._lock:
            return set(self._refresh_tokens)

    def _mint(self, scope: str, expires_in: int) -> dict[str, Any]:
        """Register and return a new token pair; the caller holds the lock."""
        access_token = "up-at-" + secrets.token_urlsafe(24)
        refresh_token = "up-rt-" + secrets.token_urlsafe(24)
        self._access_tokens[access_token] = time.monotonic() + expires_in
        self._refresh_tokens[refresh_token] = scope
        return {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in,
                "refresh_token": refresh_token, "scope": scope}

    def _is_live(self, access_token: str) -> bool:
        with self._lock:
            expires_at = self._access_tokens.get(access_token)
        return expires_at is not None and expires_at > time.monotonic()

    # --- WSGI ----------------------------------------------------------------------------------

    def wsgi_app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """The WSGI application (usable with werkzeug's test client without starting the server)."""
        request = Request(environ)
        path = request.path
        if path == "/authorize":
            response = self._authorize(request) if request.method == "GET" else self._not_allowed("GET")
        elif path == "/token":
            response = self._token(request) if request.method == "POST" else self._not_allowed("POST")
        elif path == "/api" or path.startswith("/api/"):
            if request.method in API_METHODS:
                response = self._api(request)
            else:
                response = self._not_allowed(", ".join(sorted(API_METHODS)))
        else:
            response = _json({"error": "not_found"}, 404)
        return response(environ, start_response)

    @staticmethod
    def _not_allowed(allowed: str) -> Response:
        return _json({"error": "method_not_allowed"}, 405, {"Allow": allowed})

    def _authorize(self, request: Request) -> Response:
        """GET /authorize: validate, then redirect back with a code (or access_denied)."""
        args = request.args
        redirect_uri = args.get("redirect_uri", "")
        if not hmac.compare_digest(args.get("client_id", "").encode(), self.client_id.encode()):
            return _oauth_error(400, "invalid_request", "unknown client_id")
        if urlsplit(redirect_uri).scheme not in ("http", "https"):
            return _oauth_error(400, "invalid_request", "redirect_uri must be an absolute http(s) URL")
        if args.get("response_type") != "code":
            return _oauth_error(400, "unsupported_response_type", "response_type must be code")
        if args.get("code_challenge_method") != "S256":
            return _oauth_error(400, "invalid_request", "code_challenge_method must be S256")
        challenge = args.get("code_challenge", "")
        if not _PKCE_VALUE.fullmatch(challenge):
            return _oauth_error(400, "invalid_request", "code_challenge is missing or malformed")
        state = args.get("state")
        if self.deny_consent:
            params = {"error": "access_denied", "error_description": "the user denied consent"}
        else:
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = _PendingCode(redirect_uri, challenge, args.get("scope", ""),
                                                 time.monotonic() + CODE_LIFETIME)
            params = {"code": code}
        if state is not None:
            params["state"] = state
        separator = "&" if urlsplit(redirect_uri).query else "?"
        return Response(status=302, headers={"Location": redirect_uri + separator + urlencode(params),
                                             "Cache-Control": "no-store"})

    def _client_authenticated(self, request: Request) -> bool:
        """HTTP Basic client authentication (RFC 6749 §2.3.1: id and secret are form-encoded)."""
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        client_id, colon, client_secret = decoded.partition(":")
        if not colon:
            return False
        id_ok = hmac.compare_digest(unquote_plus(client_id).encode(), self.client_id.encode())
        secret_ok = hmac.compare_digest(unquote_plus(client_secret).encode(), self.client_secret.encode())
        form_id = request.form.get("client_id")
        return id_ok and secret_ok and (form_id is None or form_id == self.client_id)

    def _token(self, request: Request) -> Response:
        """POST /token: record the form, authenticate the client, then run the grant."""
        form = request.form.to_dict()
        with self._lock:
            self.token_requests.append(dict(form))
        if self.token_endpoint_fails:
            return _oauth_error(500, "server_error", "the upstream token endpoint is failing (test knob)")
        if request.mimetype != "application/x-www-form-urlencoded":
            return _oauth_error(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
        if not self._client_authenticated(request):
            return _oauth_error(401, "invalid_client", "client authentication failed",
                                {"WWW-Authenticate": 'Basic realm="upstream"'})
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._authorization_code_grant(form)
        if grant_type == "refresh_token":
            return self._refresh_token_grant(form)
        return _oauth_error(400, "unsupported_grant_type", f"unsupported grant_type {grant_type!r}")

    def _authorization_code_grant(self, form: dict[str, str]) -> Response:
        """Exchange a code: single use (consumed by any attempt), redirect_uri and PKCE must match."""
        verifier = form.get("code_verifier", "")
        with self._lock:
            pending = self._codes.pop(form.get("code", ""), None)
            if pending is None or pending.expires_at <= time.monotonic():
                return _oauth_error(400, "invalid_grant", "unknown, used or expired code")
            if form.get("redirect_uri") != pending.redirect_uri:
                return _oauth_error(400, "invalid_grant", "redirect_uri does not match /authorize")
            if not _PKCE_VALUE.fullmatch(verifier) or not hmac.compare_digest(
                    pkce_challenge(verifier).encode(), pending.code_challenge.encode()):
                return _oauth_error(400, "invalid_grant", "code_verifier does not match code_challenge")
            tokens = self._mint(pending.scope, self.access_token_lifetime)
        return _json(tokens, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _refresh_token_grant(self, form: dict[str, str]) -> Response:
        """Rotate a refresh token: it works once; the new pair keeps the originally granted scope."""
        with self._lock:
            scope = self._refresh_tokens.pop(form.get("refresh_token", ""), None)
            if scope is None:
                return _oauth_error(400, "invalid_grant", "unknown or already used refresh_token")
            tokens = self._mint(scope, self.access_token_lifetime)
        return _json(tokens, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _api(self, request: Request) -> Response:
        """ANY /api/*: record, wait ``api_delay``, require a live bearer token, then answer."""
        raw_path, query = _raw_path_and_query(request.environ)
        recorded = Recorded(method=request.method, path=raw_path, query=query,
                            headers=dict(request.headers.items()), body=request.get_data())
        with self._lock:
            self.requests.append(recorded)
        if self.api_delay > 0:
            self._stopping.wait(self.api_delay)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self._is_live(token.strip()):
            return _json({"error": "invalid_token"}, 401,
                         {"WWW-Authenticate": 'Bearer error="invalid_token"'})

        parts = request.path.split("/")  # decoded: ["", "api", ...]
        if len(parts) == 4 and parts[2] in ("stream", "big") and parts[3].isdigit():
            size = int(parts[3])
            if parts[2] == "stream":
                return Response(_stream_chunks(size), mimetype="application/octet-stream")
            return Response(big_body(size), mimetype="application/octet-stream")
        if request.path == "/api/echo":
            return Response(recorded.body,
                            content_type=request.headers.get("Content-Type", "application/octet-stream"))
        return _json({"ok": True, "method": request.method, "path": raw_path, "query": query}, 200,
                     {"Set-Cookie": "upstream_session=secret", "X-Upstream": "yes"})


def main() -> None:
    """``python -m tests.upstream --port 9090``: the fake upstream for trying the provider by
    hand (README's worked example). Prints the config table to paste and a token pair."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=9090)
    port = parser.parse_args().port
    fake = FakeUpstream().start(port)
    tokens = fake.issue_tokens()
    print(f"""fake upstream on {fake.url}; add to instance/provider.toml:
{fake.config_table()}
an upstream access token to deposit: {tokens["access_token"]}
its refresh token: {tokens["refresh_token"]}
(Ctrl-C stops it)""", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
