"""One error hierarchy, rendered in one place as RFC 6749 §5.2 JSON.

Protocol code raises an :class:`OAuthError` subclass; :func:`init_app` turns it, any HTTP
error Werkzeug raises, and anything unexpected into ``{"error", "error_description"}``.
Unexpected exceptions become ``server_error`` with no detail; the traceback goes to the log
under the request id the response carries in ``X-Request-Id``.
"""

from __future__ import annotations

import logging
import secrets
from typing import ClassVar

from flask import Flask, current_app, g, request
from werkzeug.exceptions import HTTPException

from provider import fastjson, metrics
from provider.audit import REQUEST_ID

log = logging.getLogger("provider")


class OAuthError(Exception):
    """Base class: ``error`` code, HTTP ``status_code`` and a human ``description``."""

    error: ClassVar[str] = "server_error"
    status_code: ClassVar[int] = 400
    default_description: ClassVar[str] = ""

    def __init__(self, description: str | None = None, headers: dict[str, str] | None = None):
        self.description = description or self.default_description
        self.headers = headers or {}
        super().__init__(self.description)

    def body(self) -> dict[str, str]:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body


class InvalidRequest(OAuthError):
    """RFC 6749 §5.2: The request is missing a required parameter, includes an unsupported
    parameter value (other than grant type), repeats a parameter, includes multiple
    credentials, ... or is otherwise malformed."""

    error = "invalid_request"


class InvalidClient(OAuthError):
    """RFC 6749 §5.2: Client authentication failed (e.g., unknown client, no client
    authentication included, or unsupported authentication method). ... the authorization
    server MUST respond with an HTTP 401 (Unauthorized) status code and include the
    "WWW-Authenticate" response header field."""

    error = "invalid_client"
    status_code = 401
    default_description = "client authentication failed"

    def __init__(self, description: str | None = None):
        super().__init__(description, {"WWW-Authenticate": 'Basic realm="token-provider"'})


class InvalidGrant(OAuthError):
    """RFC 6749 §5.2: The provided authorization grant ... or refresh token is invalid,
    expired, revoked, does not match the redirection URI used in the authorization request,
    or was issued to another client."""

    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    """RFC 6749 §5.2: The authenticated client is not authorized to use this authorization
    grant type."""

    error = "unauthorized_client"


class Forbidden(UnauthorizedClient):
    """The authenticated client may not use this endpoint (403; RFC 6749 names no code for
    it, so the closest, ``unauthorized_client``, is used)."""

    status_code = 403


class UnsupportedGrantType(OAuthError):
    """RFC 6749 §5.2: The authorization grant type is not supported by the authorization
    server."""

    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    """RFC 6749 §5.2: The requested scope is invalid, unknown, malformed, or exceeds the
    scope granted by the resource owner."""

    error = "invalid_scope"


class InvalidTarget(OAuthError):
    """RFC 8693 §2.2.2 / RFC 8707 §2: The authorization server is unwilling or unable to
    issue a token for any target service indicated by the "resource" or "audience"
    parameters."""

    error = "invalid_target"


class UnsupportedTokenType(OAuthError):
    """RFC 7009 §2.2.1: The authorization server does not support the revocation of the
    presented token type."""

    error = "unsupported_token_type"


class InvalidToken(OAuthError):
    """RFC 6750 §3.1: The access token provided is expired, revoked, malformed, or invalid
    for other reasons. The resource SHOULD respond with the HTTP 401 (Unauthorized)."""

    error = "invalid_token"
    status_code = 401

    def __init__(self, description: str | None = None):
        challenge = 'Bearer realm="token-provider", error="invalid_token"'
        super().__init__(description, {"WWW-Authenticate": challenge})


class InsufficientScope(OAuthError):
    """RFC 6750 §3.1: The request requires higher privileges than provided by the access
    token. The resource server SHOULD respond with the HTTP 403 (Forbidden)."""

    error = "insufficient_scope"
    status_code = 403

    def __init__(self, description: str | None = None, scope: str | None = None):
        challenge = 'Bearer realm="token-provider", error="insufficient_scope"'
        if scope:
            challenge += f', scope="{scope}"'
        super().__init__(description, {"WWW-Authenticate": challenge})


class MissingToken(OAuthError):
    """RFC 6750 §3.1: "If the request lacks any authentication information ..., the resource
    server SHOULD NOT include an error code or other error information" in the challenge."""

    error = "invalid_request"
    status_code = 401
    default_description = "an access token is required in the Authorization header"

    def __init__(self, description: str | None = None):
        super().__init__(description, {"WWW-Authenticate": 'Bearer realm="token-provider"'})


class AccessDenied(OAuthError):
    """RFC 6749 §4.1.2.1 access_denied: the request is refused for a reason not told."""

    error = "access_denied"
    status_code = 403
    default_description = "the request is not allowed from here"


class BadGateway(OAuthError):
    error = "bad_gateway"
    status_code = 502
    default_description = "the upstream could not be reached or refused the call"


class GatewayTimeout(OAuthError):
    error = "gateway_timeout"
    status_code = 504
    default_description = "the upstream did not answer in time"


class NotFound(OAuthError):
    error = "not_found"
    status_code = 404
    default_description = "no such resource"


class MethodNotAllowed(OAuthError):
    error = "invalid_request"
    status_code = 405
    default_description = "method not allowed"


class RequestTooLarge(OAuthError):
    error = "invalid_request"
    status_code = 413
    default_description = "request body too large"


class TemporarilyUnavailable(OAuthError):
    """RFC 6749 §4.1.2.1: The authorization server is currently unable to handle the
    request due to a temporary overloading or maintenance of the server."""

    error = "temporarily_unavailable"
    status_code = 503


class ServerError(OAuthError):
    """RFC 6749 §4.1.2.1: The authorization server encountered an unexpected condition that
    prevented it from fulfilling the request."""

    error = "server_error"
    status_code = 500


_HTTP_ERRORS: dict[int, type[OAuthError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
}


def render(error: OAuthError):
    """The one place an error becomes a response; every refusal is counted and audited."""
    endpoint = request.endpoint or "unknown"
    g.outcome = error.error
    metrics.count(metrics.REFUSALS, endpoint, error.error)
    if error.status_code == 429:
        metrics.count(metrics.RATE_LIMIT_HITS, endpoint)
    provider = current_app.extensions.get("provider")
    if provider is not None:
        provider.event("refusal", endpoint=endpoint, error=error.error, status=error.status_code,
                       client_id=g.get("client_id"))
    response = current_app.response_class(
        fastjson.dumps(error.body()), status=error.status_code, mimetype="application/json"
    )
    response.headers.update(error.headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> None:
        g.request_id = secrets.token_hex(8)
        REQUEST_ID.set(g.request_id)

    @app.after_request
    def expose_request_id(response):
        request_id = g.get("request_id")
        if request_id:
            response.headers["X-Request-Id"] = request_id
        metrics.count(metrics.REQUESTS, request.endpoint or "unknown", g.get("outcome", "ok"))
        return response

    @app.errorhandler(OAuthError)
    def handle_oauth_error(error: OAuthError):
        return render(error)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException):
        code = error.code or 500
        cls = _HTTP_ERRORS.get(code) or (InvalidRequest if code < 500 else ServerError)
        response = render(cls())
        response.status_code = code
        # Keep what the status needs, such as Allow on 405 (RFC 9110 §15.5.6).
        for name, value in error.get_headers():
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        log.error(
            "unexpected error on %s %s (request %s)",
            request.method,
            request.path,
            g.get("request_id", "-"),
            exc_info=error,
        )
        return render(ServerError())
