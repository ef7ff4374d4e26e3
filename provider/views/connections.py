"""The vault's HTTP face: deposit (``POST /connections``), show and delete a connection."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from provider import connections
from provider.clients import Client
from provider.errors import Forbidden, InvalidRequest
from provider.schemas import DepositRequest, load
from provider.views import authenticated_client, json_response, provider

bp = Blueprint("connections", __name__)
_deposit = DepositRequest()
_CREDENTIAL_FIELDS = ("client_id", "client_secret", "client_assertion", "client_assertion_type")


def _json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise InvalidRequest("the request body must be application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _connections_client(body: dict[str, Any] | None = None) -> Client:
    """A client authenticated by any method, with credentials in headers or the JSON body,
    that was created with ``--connections``."""
    credentials = {k: v for k, v in (body or {}).items() if k in _CREDENTIAL_FIELDS}
    if any(not isinstance(v, str) for v in credentials.values()):
        raise InvalidRequest("client credentials must be strings")
    client = authenticated_client(credentials)
    if not client.can_manage_connections:
        raise Forbidden("this client may not manage connections")
    return client


@bp.post("/connections")
def deposit():
    body = _json_body()
    client = _connections_client(body)
    params = load(_deposit, {k: v for k, v in body.items() if k not in _CREDENTIAL_FIELDS})
    answer = connections.deposit(provider(), client, params)
    provider().event("deposit", client_id=client.client_id, sub=params["subject"],
                     upstream=params["upstream"], connection_id=answer["connection_id"])
    return json_response(answer, 201)


@bp.get("/connections/<connection_id>")
def show(connection_id: str):
    client = _connections_client()
    row = connections.visible_to(client, provider().storage.get_connection(connection_id))
    return json_response(connections.describe(row))


@bp.delete("/connections/<connection_id>")
def delete(connection_id: str):
    client = _connections_client()
    row = connections.visible_to(client, provider().storage.get_connection(connection_id))
    connections.revoke_connection(provider(), row["connection_id"],
                                  f"deleted by client {client.client_id}"[:64])
    return json_response(None, 204)
