"""Thin blueprints: parse the request, call one protocol function, render the answer."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, g, request

from provider import fastjson
from provider.client_auth import authenticate
from provider.clients import Client
from provider.errors import InvalidClient
from provider.ratelimit import Admission
from provider.service import Provider


def provider() -> Provider:
    return current_app.extensions["provider"]


def json_response(body: Any, status: int = 200, *, no_store: bool = True):
    """JSON with ``Cache-Control: no-store`` (RFC 6749 §5.1) unless said otherwise."""
    response = current_app.response_class(fastjson.dumps(body), status=status,
                                          mimetype="application/json")
    if no_store:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    return response


def authenticated_client(credentials: dict[str, Any]) -> Client:
    """RFC 6749 §2.3 client authentication, behind the failed-authentication circuit breaker
    (see :func:`counted_client`), for an endpoint without a limit of its own."""
    client, admission = counted_client(credentials, counted_as=None)
    admission.check()
    return client


def counted_client(credentials: dict[str, Any],
                   counted_as: str | None) -> tuple[Client, Admission]:
    """RFC 6749 §2.3 client authentication, behind the failed-authentication circuit breaker:
    every failure counts for its address, and an address over its limit is refused (429)
    whether its credentials are right or wrong, before they are looked at once this process
    has seen it closed. ``counted_as`` ("token", "introspect") also counts the request against
    the client's limit for that endpoint, in the same round trip.

    The limiter's verdict comes back as an :class:`Admission`: the caller checks it before
    anything with an effect, and may verify and parse while Redis answers."""
    p = provider()
    address = request.remote_addr or "-"
    p.limiter.refuse_known_closed(address)
    try:
        client = authenticate(p, credentials, request.headers.get("Authorization"),
                              request.remote_addr, lambda: request.base_url)
    except InvalidClient:
        p.limiter.record_failed_auth(address)  # 429 instead, once the address is over
        raise
    g.client_id = client.client_id
    return client, p.limiter.admit(address, client.client_id, counted_as)


def register(app: Flask) -> None:
    from provider.views import connect, connections, gateway, health, metrics, oauth, wellknown

    for module in (oauth, connections, connect, gateway, wellknown, health, metrics):
        app.register_blueprint(module.bp)
