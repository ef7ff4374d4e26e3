"""``ANY /gateway/{upstream}/{path}``: scoped forwarding (see :mod:`provider.gateway`)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request, stream_with_context

from provider.errors import RequestTooLarge
from provider.gateway import downstream_headers
from provider.views import provider

bp = Blueprint("gateway", __name__)
# Every method a route could name, and the rest of RFC 9110's: an undeclared one is 404.
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
CHUNK = 65536


@bp.route("/gateway/<upstream>", defaults={"path": ""}, methods=METHODS, strict_slashes=False)
@bp.route("/gateway/<upstream>/<path:path>", methods=METHODS)
def forward(upstream: str, path: str):
    gateway = provider().gateway
    call = gateway.authorize(
        upstream_name=upstream, method=request.method, raw_path=_raw_path(upstream),
        authorization=request.headers.get("Authorization"), query_args=request.args,
        remote_addr=request.remote_addr, dpop_proofs=request.headers.getlist("DPoP"))
    body, replayable = _body()
    answer = gateway.forward(
        call, method=request.method, query=request.query_string.decode("latin-1"),
        headers=list(request.headers.items()), body=body, body_replayable=replayable)

    def stream():
        sent = 0
        try:
            for chunk in answer.stream(CHUNK, decode_content=False):
                sent += len(chunk)
                yield chunk
        finally:
            answer.release_conn()
            provider().event("gateway.call", client_id=call.claims["client_id"],
                             sub=call.claims["sub"], jti=call.claims["jti"], method=request.method,
                             upstream=call.upstream.name, route=call.route.path,
                             status=answer.status, bytes=sent)

    return current_app.response_class(stream_with_context(stream()), status=answer.status,
                                      headers=downstream_headers(answer.headers),
                                      direct_passthrough=True)


def _raw_path(upstream: str) -> str:
    """The path after ``/gateway/{upstream}`` exactly as sent: before any percent-decoding,
    so that an encoded slash or dot is seen (and refused) rather than silently decoded."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.path
    raw = raw.split("?", 1)[0]
    prefix = f"/gateway/{upstream}"
    return raw[len(prefix):] if raw.startswith(prefix) else "\0"


def _body() -> tuple[Any, bool]:
    """The request body, bounded by ``gateway.max_body_bytes`` (not the token endpoints' much
    smaller bound), and whether it can be sent twice (after a refresh).

    A body with a Content-Length over the bound is refused before a byte is read; up to 1 MiB is
    read (so that a retry is possible), more streams. A chunked body announces no length, so it
    is read up to the bound first: nothing reaches the upstream unless the whole body fits.
    """
    limit = provider().settings.gateway.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge()
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = request.environ["wsgi.input"].read(limit + 1)
        if len(body) > limit:
            raise RequestTooLarge()
        return body, True
    if not length:
        return None, True
    request.max_content_length = limit
    if length <= CHUNK * 16:
        return request.stream.read(length), True
    return _chunks(request.stream), False


def _chunks(stream: Any):
    while chunk := stream.read(CHUNK):
        yield chunk
