"""Talking to upstreams: their OAuth token endpoints (connect flow, refresh) and their APIs.

One urllib3 pool per process keeps connections to each upstream alive between calls (a new TLS
handshake per gateway call would cost more than everything else the gateway does), with the
connect and read bounds from ``[gateway]``. Upstream answers are never echoed to our callers
when they concern credentials: failures become one-line reasons for the log and generic errors.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

import urllib3

from provider.config import Gateway, Upstream

_MAX_TOKEN_RESPONSE = 65536


class UpstreamError(Exception):
    """The upstream could not be reached or answered unusably; the message is for the log."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within ``gateway.read_timeout``."""


class UpstreamHTTP:
    def __init__(self, settings: Gateway):
        self.timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout)
        self.pool = urllib3.PoolManager(num_pools=32, maxsize=8, retries=False,
                                        timeout=self.timeout)

    def request(self, method: str, url: str, *, headers: dict[str, str], body: Any = None,
                stream: bool = True) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(method, url, headers=headers, body=body,
                                     preload_content=not stream, redirect=False,
                                     decode_content=False)
        except urllib3.exceptions.ReadTimeoutError:
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except urllib3.exceptions.HTTPError as exc:
            raise UpstreamError(f"the upstream could not be reached: {type(exc).__name__}") from None

    def token(self, upstream: Upstream, form: dict[str, str]) -> dict[str, Any]:
        """POST to the upstream's token endpoint (client_secret_basic); the parsed JSON."""
        headers = urllib3.make_headers(basic_auth=f"{upstream.client_id}:{upstream.client_secret}")
        headers.update({"Content-Type": "application/x-www-form-urlencoded",
                        "Accept": "application/json"})
        response = self.request("POST", upstream.token_url, headers=headers,
                                body=urlencode(form), stream=True)
        try:
            data = response.read(_MAX_TOKEN_RESPONSE + 1, decode_content=True)
        finally:
            response.release_conn()
        if response.status != 200:
            raise UpstreamError(f"the upstream token endpoint answered {response.status}")
        if len(data) > _MAX_TOKEN_RESPONSE:
            raise UpstreamError("the upstream token response is too large")
        try:
            answer = json.loads(data)
        except ValueError:
            raise UpstreamError("the upstream token response is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise UpstreamError("the upstream token response has no access_token")
        return answer


def credential_from_token_response(answer: dict[str, Any],
                                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the vault keeps of an upstream token response (RFC 6749 §5.1)."""
    credential: dict[str, Any] = {"access_token": answer["access_token"]}
    refresh_token = answer.get("refresh_token") or (previous or {}).get("refresh_token")
    if isinstance(refresh_token, str):
        credential["refresh_token"] = refresh_token
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        credential["expires_at"] = time.time() + expires_in
    if isinstance(answer.get("scope"), str):
        credential["scope"] = answer["scope"]
    return credential
