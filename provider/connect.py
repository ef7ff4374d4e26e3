"""The connect flow: a user links an upstream account through the provider.

1. The client starts it from its back channel (in the spirit of RFC 9126, pushed authorization
   requests): ``POST /connect/{upstream}`` with the subject, a registered ``redirect_uri``,
   ``state`` and a PKCE S256 ``code_challenge``. The answer is a single-use ``authorization_url``
   valid for a minute, so the browser can never change who is connecting or where it returns.
2. The browser opens it; the provider sends it to the upstream's authorization endpoint with its
   own ``state`` (derived from the request's secret) and its own PKCE pair (RFC 7636).
3. ``/connect/{upstream}/callback`` spends the state once, redeems the upstream code from the
   back channel, seals the credential, and redirects to the client's ``redirect_uri`` with a
   one-time code, the client's ``state`` and ``iss`` (RFC 9207).
4. The client redeems the code at ``/token`` (``authorization_code`` grant, PKCE verifier).

A callback whose state is unknown, spent or expired cannot be tied to any client, so it ends on
a plain error page instead of a redirect (RFC 6749 §4.1.2.1: never redirect to an unverified
URI). Every other failure (consent denied, upstream token endpoint failing) redirects to the
client's registered URI with an error and stores nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from provider.connections import connection_scope, store_credential, upstream_named
from provider.errors import InvalidRequest, OAuthError, UnauthorizedClient
from provider.tokens import new_id
from provider.upstreams import UpstreamError, credential_from_token_response

if TYPE_CHECKING:
    from provider.clients import Client
    from provider.service import Provider

log = logging.getLogger("provider.connect")

REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"
REQUEST_LIFETIME = 60
CODE_LIFETIME = 60
PKCE_VALUE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 §4.1, §4.2


class ConnectPageError(OAuthError):
    """A callback that cannot be trusted to redirect anywhere: a plain error answer."""

    error = "invalid_request"


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _upstream_state(request_secret: str) -> str:
    digest = hmac.new(request_secret.encode(), b"upstream state", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _callback_url(provider: Provider, upstream: str) -> str:
    return f"{provider.settings.issuer}/connect/{upstream}/callback"


def _with_query(uri: str, params: dict[str, str]) -> str:
    return uri + ("&" if "?" in uri else "?") + urlencode(params)


def start(provider: Provider, client: Client, upstream_name: str,
          request: dict[str, Any]) -> dict[str, Any]:
    """``POST /connect/{upstream}``: record the request; answer the authorization URL."""
    if "authorization_code" not in client.grant_types:
        raise UnauthorizedClient("this client is not registered for the authorization_code grant")
    upstream = upstream_named(provider, upstream_name)
    if not (upstream.authorize_url and upstream.token_url and upstream.client_id):
        raise InvalidRequest("this upstream has no OAuth endpoints configured")
    if request["redirect_uri"] not in client.redirect_uris:
        raise InvalidRequest("redirect_uri is not one registered for this client")
    if request["code_challenge_method"] != "S256":
        raise InvalidRequest("code_challenge_method must be S256")
    if not PKCE_VALUE.match(request["code_challenge"]):
        raise InvalidRequest("code_challenge is malformed")
    scope = connection_scope(upstream, request.get("scope"))
    request_secret = secrets.token_urlsafe(32)
    provider.storage.add_connect_request({
        "request_id": sha256_hex(request_secret),
        "upstream_state": sha256_hex(_upstream_state(request_secret)),
        "client_id": client.client_id, "subject": request["subject"],
        "upstream": upstream.name, "redirect_uri": request["redirect_uri"],
        "client_state": request.get("state"), "code_challenge": request["code_challenge"],
        "scope": scope, "upstream_verifier": secrets.token_urlsafe(48),
        "expires_at": time.time() + REQUEST_LIFETIME,
    })
    query = urlencode({"request_uri": REQUEST_URI_PREFIX + request_secret})
    return {"authorization_url": f"{provider.settings.issuer}/connect/{upstream.name}?{query}",
            "expires_in": REQUEST_LIFETIME}


def authorization_redirect(provider: Provider, upstream_name: str, request_uri: str | None) -> str:
    """``GET /connect/{upstream}?request_uri=…``: spend the request; where to send the browser."""
    upstream = upstream_named(provider, upstream_name)
    if not request_uri or not request_uri.startswith(REQUEST_URI_PREFIX):
        raise ConnectPageError("request_uri is missing or malformed")
    request_secret = request_uri[len(REQUEST_URI_PREFIX):]
    row = provider.storage.open_connect_request(sha256_hex(request_secret), upstream.name,
                                                time.time())
    if row is None:
        raise ConnectPageError("this connect link is unknown, used or expired")
    return _with_query(upstream.authorize_url, {
        "response_type": "code", "client_id": upstream.client_id,
        "redirect_uri": _callback_url(provider, upstream.name),
        "scope": " ".join(upstream.scopes), "state": _upstream_state(request_secret),
        "code_challenge": s256(row["upstream_verifier"]), "code_challenge_method": "S256",
    })


def callback(provider: Provider, upstream_name: str, args: dict[str, str]) -> str:
    """``GET /connect/{upstream}/callback``: the client redirect URI to send the browser to."""
    upstream = upstream_named(provider, upstream_name)
    state = args.get("state")
    row = provider.storage.complete_connect_request(sha256_hex(state), upstream.name,
                                                    time.time()) if state else None
    if row is None:
        raise ConnectPageError("this callback is unknown, used or expired")
    reply = {"state": row["client_state"]} if row["client_state"] else {}
    reply["iss"] = provider.settings.issuer
    if "error" in args or not args.get("code"):
        denied = args.get("error") == "access_denied"
        return _with_query(row["redirect_uri"], {
            "error": "access_denied" if denied else "invalid_request",
            "error_description": "the user did not grant access" if denied
            else "the upstream did not return a code", **reply})
    try:
        answer = provider.upstream_http.token(upstream, {
            "grant_type": "authorization_code", "code": args["code"],
            "redirect_uri": _callback_url(provider, upstream.name),
            "code_verifier": row["upstream_verifier"], "client_id": upstream.client_id,
        })
    except UpstreamError as exc:
        log.warning("connect to %s failed: %s", upstream.name, exc)
        return _with_query(row["redirect_uri"], {
            "error": "temporarily_unavailable",
            "error_description": "the upstream could not complete the connection", **reply})
    connection_id = store_credential(
        provider, subject=row["subject"], upstream=upstream, scope=row["scope"],
        credential=credential_from_token_response(answer), created_by=row["client_id"])
    provider.event("deposit", client_id=row["client_id"], sub=row["subject"],
                   upstream=upstream.name, connection_id=connection_id, via="connect")
    code = secrets.token_urlsafe(32)
    provider.storage.add_authorization_code({
        "code_hash": sha256_hex(code), "client_id": row["client_id"],
        "redirect_uri": row["redirect_uri"], "code_challenge": row["code_challenge"],
        "subject": row["subject"], "upstream": upstream.name, "connection_id": connection_id,
        "scope": row["scope"], "family_id": new_id(), "expires_at": time.time() + CODE_LIFETIME,
    })
    return _with_query(row["redirect_uri"], {"code": code, **reply})
