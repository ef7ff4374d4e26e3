"""Self-tests of the fake upstream (tests/upstream.py): it must behave as the provider's tests assume."""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from werkzeug.test import Client

from tests.upstream import FakeUpstream, big_body, pkce_challenge, stream_body

REDIRECT_URI = "https://provider.test/callback"


@dataclass
class Reply:
    """What came back over the wire."""

    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def call(method: str, url: str, *, headers: dict[str, str] | None = None, data: bytes | None = None,
         timeout: float = 5) -> Reply:
    """One HTTP request over a real socket; error statuses and redirects are returned, not raised."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())


def basic(client_id: str = "provider-at-upstream", secret: str = "upstream-secret") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def post_token(fake: FakeUpstream, form: dict[str, str], headers: dict[str, str] | None = None) -> Reply:
    return call("POST", fake.token_url, data=urlencode(form).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded",
                         **(basic() if headers is None else headers)})


def authorize(fake: FakeUpstream, challenge: str, **overrides: str) -> Reply:
    params = {"response_type": "code", "client_id": fake.client_id, "redirect_uri": REDIRECT_URI,
              "scope": "read write", "state": "st-123", "code_challenge": challenge,
              "code_challenge_method": "S256", **overrides}
    return call("GET", fake.authorize_url + "?" + urlencode(params))


def code_for(fake: FakeUpstream, verifier: str) -> str:
    reply = authorize(fake, pkce_challenge(verifier))
    assert reply.status == 302
    return parse_qs(urlsplit(reply.headers["Location"]).query)["code"][0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_authorization_code_flow_with_pkce(upstream: FakeUpstream) -> None:
    verifier = secrets.token_urlsafe(48)
    reply = authorize(upstream, pkce_challenge(verifier))
    assert reply.status == 302
    location = urlsplit(reply.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
    params = parse_qs(location.query)
    assert params["state"] == ["st-123"]

    form = {"grant_type": "authorization_code", "code": params["code"][0], "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier}
    tokens = post_token(upstream, form)
    assert tokens.status == 200
    assert tokens.headers["Cache-Control"] == "no-store"
    body = tokens.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "read write"
    assert body["access_token"] in upstream.valid_access_tokens()
    assert upstream.token_requests == [form]

    # Single use, whatever the outcome.
    assert post_token(upstream, form).json()["error"] == "invalid_grant"


@pytest.mark.parametrize("change", [{"code_verifier": "x" * 43}, {"code_verifier": ""},
                                    {"redirect_uri": "https://provider.test/other"}, {"code": "nope"}])
def test_code_exchange_checks_verifier_redirect_uri_and_code(upstream: FakeUpstream,
                                                             change: dict[str, str]) -> None:
    verifier = secrets.token_urlsafe(48)
    form = {"grant_type": "authorization_code", "code": code_for(upstream, verifier),
            "redirect_uri": REDIRECT_URI, "code_verifier": verifier, **change}
    reply = post_token(upstream, form)
    assert (reply.status, reply.json()["error"]) == (400, "invalid_grant")
    assert upstream.valid_access_tokens() == set()


@pytest.mark.parametrize("override", [{"client_id": "someone-else"}, {"response_type": "token"},
                                      {"code_challenge_method": "plain"}, {"code_challenge": ""},
                                      {"redirect_uri": "not-a-url"}])
def test_authorize_rejects_malformed_requests_without_redirecting(upstream: FakeUpstream,
                                                                  override: dict[str, str]) -> None:
    reply = authorize(upstream, pkce_challenge("v" * 43), **override)
    assert reply.status == 400
    assert "Location" not in reply.headers
    assert reply.json()["error"]


def test_denied_consent_redirects_with_access_denied(upstream: FakeUpstream) -> None:
    upstream.deny_consent = True
    reply = authorize(upstream, pkce_challenge("v" * 43))
    assert reply.status == 302
    params = parse_qs(urlsplit(reply.headers["Location"]).query)
    assert params["error"] == ["access_denied"]
    assert params["state"] == ["st-123"]
    assert "code" not in params


@pytest.mark.parametrize("headers", [{}, basic(secret="wrong"), basic(client_id="other"),
                                     {"Authorization": "Basic !!!"}])
def test_token_endpoint_requires_basic_client_auth(upstream: FakeUpstream, headers: dict[str, str]) -> None:
    refresh = upstream.issue_tokens()["refresh_token"]
    reply = post_token(upstream, {"grant_type": "refresh_token", "refresh_token": refresh}, headers)
    assert (reply.status, reply.json()["error"]) == (401, "invalid_client")
    assert refresh in upstream.valid_refresh_tokens()


def test_refresh_rotates_and_reuse_is_rejected(upstream: FakeUpstream) -> None:
    upstream.access_token_lifetime = 120
    first = upstream.issue_tokens(scope="read")
    reply = post_token(upstream, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert reply.status == 200
    second = reply.json()
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert (second["expires_in"], second["scope"]) == (120, "read")
    assert upstream.valid_refresh_tokens() == {second["refresh_token"]}

    reuse = post_token(upstream, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert (reuse.status, reuse.json()["error"]) == (400, "invalid_grant")
    assert [form["refresh_token"] for form in upstream.token_requests] == [first["refresh_token"]] * 2


def test_failing_token_endpoint_answers_500_and_still_records(upstream: FakeUpstream) -> None:
    upstream.token_endpoint_fails = True
    form = {"grant_type": "refresh_token", "refresh_token": upstream.issue_tokens()["refresh_token"]}
    reply = post_token(upstream, form)
    assert (reply.status, reply.json()["error"]) == (500, "server_error")
    assert upstream.token_requests == [form]


def test_api_records_the_raw_request_and_answers_json(upstream: FakeUpstream) -> None:
    token = upstream.issue_tokens()["access_token"]
    reply = call("POST", upstream.base_url + "/repos/a%2Fb%20c/items?q=1%2B2&x=",
                 data=b'{"a": 1}', headers={**bearer(token), "Content-Type": "application/json",
                                            "X-Custom": "yes"})
    assert reply.status == 200
    assert reply.json() == {"ok": True, "method": "POST", "path": "/api/repos/a%2Fb%20c/items",
                            "query": "q=1%2B2&x="}
    assert reply.headers["Set-Cookie"] == "upstream_session=secret"
    assert reply.headers["X-Upstream"] == "yes"
    [recorded] = upstream.requests
    assert (recorded.method, recorded.path, recorded.query) == ("POST", "/api/repos/a%2Fb%20c/items",
                                                                "q=1%2B2&x=")
    assert recorded.body == b'{"a": 1}'
    assert recorded.headers["Authorization"] == f"Bearer {token}"
    assert recorded.header("x-custom") == "yes"
    assert recorded.header("cookie") is None


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE"])
def test_api_accepts_every_method(upstream: FakeUpstream, method: str) -> None:
    token = upstream.issue_tokens()["access_token"]
    reply = call(method, upstream.base_url + "/things/1", headers=bearer(token))
    assert reply.status == 200
    if method == "HEAD":
        assert reply.body == b""
    else:
        assert reply.json()["method"] == method
    assert upstream.requests[0].method == method


def test_api_rejects_missing_unknown_expired_tokens_after_recording(upstream: FakeUpstream) -> None:
    live = upstream.issue_tokens()["access_token"]
    stale = upstream.issue_tokens(expires_in=0)["access_token"]
    upstream.expire(live)
    attempts = [{}, bearer("made-up"), bearer(stale), bearer(live), {"Authorization": f"Basic {live}"}]
    for headers in attempts:
        reply = call("GET", upstream.base_url + "/me", headers=headers)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert len(upstream.requests) == len(attempts)
    assert upstream.valid_access_tokens() == set()


def test_stream_big_and_echo(upstream: FakeUpstream) -> None:
    headers = bearer(upstream.issue_tokens()["access_token"])
    stream = call("GET", upstream.base_url + "/stream/30", headers=headers)
    assert stream.status == 200
    assert stream.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in stream.headers
    assert stream.body == stream_body(30) and len(stream.body) == 30 * 1024

    big = call("GET", upstream.base_url + "/big/100001", headers=headers)
    assert big.headers["Content-Length"] == "100001"
    assert big.body == big_body(100001)

    payload = bytes(range(256)) * 10
    echo = call("PUT", upstream.base_url + "/echo", data=payload,
                headers={**headers, "Content-Type": "image/png"})
    assert (echo.status, echo.body, echo.headers["Content-Type"]) == (200, payload, "image/png")


def test_chunked_request_bodies_are_recorded_whole(upstream: FakeUpstream) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(upstream.url).port, timeout=5)
    try:
        connection.request("POST", "/api/echo", body=iter([b"abc", b"", b"defg"]), encode_chunked=True,
                           headers={**bearer(upstream.issue_tokens()["access_token"]),
                                    "Content-Type": "text/plain"})
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"abcdefg")
    finally:
        connection.close()
    [recorded] = upstream.requests
    assert recorded.body == b"abcdefg"
    assert recorded.header("transfer-encoding") == "chunked"


def test_api_delay_times_out_clients_and_stop_is_prompt() -> None:
    fake = FakeUpstream().start()
    try:
        fake.api_delay = 5.0
        token = fake.issue_tokens()["access_token"]
        started = time.monotonic()
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            call("GET", fake.base_url + "/slow", headers=bearer(token), timeout=0.2)
        assert time.monotonic() - started < 1
        assert [r.path for r in fake.requests] == ["/api/slow"]
    finally:
        started = time.monotonic()
        fake.stop()
    assert time.monotonic() - started < 1
    with pytest.raises(urllib.error.URLError):
        call("GET", fake.url + "/api/x", timeout=0.5)


def test_concurrent_requests_are_all_recorded(upstream: FakeUpstream) -> None:
    token = upstream.issue_tokens()["access_token"]
    statuses: list[int] = []

    def worker(index: int) -> None:
        statuses.append(call("GET", f"{upstream.base_url}/n/{index}", headers=bearer(token)).status)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 40
    assert sorted(r.path for r in upstream.requests) == sorted(f"/api/n/{i}" for i in range(40))


def test_wsgi_app_works_without_a_server() -> None:
    fake = FakeUpstream()
    token = fake.issue_tokens()["access_token"]
    reply = Client(fake.wsgi_app).get("/api/plain?a=b", headers=bearer(token))
    assert reply.status_code == 200
    assert reply.json == {"ok": True, "method": "GET", "path": "/api/plain", "query": "a=b"}
    with pytest.raises(RuntimeError):
        _ = fake.url


def test_the_fake_upstream_imports_nothing_make_run_does_not_install():
    """The README's worked example runs ``python -m tests.upstream`` in the venv ``make run``
    made, which has no test dependencies."""
    blocked = "import sys\nfor name in ('pytest', 'hypothesis', 'schemathesis', 'joserfc'):\n" \
              "    sys.modules[name] = None\nimport tests.upstream\n"
    subprocess.run([sys.executable, "-c", blocked], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
