"""Connections: one vaulted upstream credential per (subject, upstream).

A deposit seals the credential under the vault's public key, replaces any earlier connection of
the same subject and upstream (revoking every token derived from it), and answers an internal
access token and refresh token for the connection. Their ``aud`` is the upstream's gateway
resource, ``{issuer}/gateway/{upstream}``, which exchanges narrow with ``resource``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from provider.config import ConfigError, Upstream, address_in, parse_networks
from provider.errors import InvalidRequest, InvalidScope, NotFound
from provider.tokens import new_id

if TYPE_CHECKING:
    from provider.clients import Client
    from provider.service import Provider

# The client id of tokens an operator mints with ``connections add``. It has a space, so no
# registered client can ever hold it (client ids are printable ASCII without spaces).
OPERATOR = "token-provider cli"


def gateway_resource(issuer: str, upstream: str) -> str:
    return f"{issuer}/gateway/{upstream}"


def upstream_named(provider: Provider, name: str) -> Upstream:
    upstream = provider.settings.upstreams.get(name)
    if upstream is None:
        raise NotFound("no such upstream")
    return upstream


def route_scopes(upstream: Upstream) -> tuple[str, ...]:
    return tuple(dict.fromkeys(route.scope for route in upstream.routes))


def connection_scope(upstream: Upstream, requested: str | None) -> str:
    """Internal scopes for a connection: at most those its upstream's routes use."""
    available = route_scopes(upstream)
    if requested is None:
        return " ".join(available)
    scopes = tuple(dict.fromkeys(requested.split()))
    if not scopes or not set(scopes) <= set(available):
        raise InvalidScope("scope must be among the scopes of the upstream's routes")
    return " ".join(scopes)


def store_credential(provider: Provider, *, subject: str, upstream: Upstream, scope: str,
                     credential: dict[str, Any], created_by: str,
                     allowed_ips: list[str] | None = None) -> str:
    """Seal and store; returns the new connection id. A replaced connection is revoked."""
    try:
        networks = [str(n) for n in parse_networks(allowed_ips or [])]
    except ConfigError:
        raise InvalidRequest("allowed_ips must be CIDR ranges") from None
    connection_id = new_id()
    now = time.time()
    ciphertext = provider.vault.seal(connection_id, upstream.name,
                                     json.dumps(credential, separators=(",", ":")).encode())
    replaced = provider.storage.replace_connection({
        "connection_id": connection_id, "subject": subject, "upstream": upstream.name,
        "scope": scope, "ciphertext": ciphertext, "allowed_ips": networks,
        "created_by": created_by, "created_at": now, "updated_at": now,
        "upstream_expires_at": credential.get("expires_at"), "version": 1,
        "refresh_claimed_until": None,
    })
    if replaced:
        revoke_connection(provider, replaced, "replaced by a new connection", delete=False)
    return connection_id


def issue_tokens(provider: Provider, client: Client, *, connection_id: str, subject: str,
                 upstream: str, scope: str, grant_type: str, family_id: str | None = None,
                 cnf: dict[str, str] | None = None) -> dict[str, Any]:
    """An access and a refresh token for a connection (RFC 6749 §5.1 body)."""
    refresh_token, family = provider.refresh_tokens.start_family(
        client_id=client.client_id, subject=subject, scope=scope,
        audience=[gateway_resource(provider.settings.issuer, upstream)],
        connection_id=connection_id, family_id=family_id)
    token, claims = provider.refresh_tokens.mint_access_token(client, family, scope, cnf)
    provider.issued(claims, grant_type, connection_id=connection_id, family_id=family.family_id)
    return {"access_token": token, "token_type": "DPoP" if cnf else "Bearer",
            "expires_in": claims["exp"] - claims["iat"], "refresh_token": refresh_token,
            "scope": scope}


def deposit(provider: Provider, client: Client, request: dict[str, Any]) -> dict[str, Any]:
    """``POST /connections``: store the credential; answer the connection id and tokens."""
    upstream = upstream_named(provider, request["upstream"])
    scope = connection_scope(upstream, request.get("scope"))
    credential: dict[str, Any] = {"access_token": request["access_token"]}
    if request.get("refresh_token"):
        credential["refresh_token"] = request["refresh_token"]
    if request.get("expires_in"):
        credential["expires_at"] = time.time() + request["expires_in"]
    connection_id = store_credential(
        provider, subject=request["subject"], upstream=upstream, scope=scope,
        credential=credential, created_by=client.client_id,
        allowed_ips=request.get("allowed_ips"))
    tokens = issue_tokens(provider, client, connection_id=connection_id,
                          subject=request["subject"], upstream=upstream.name, scope=scope,
                          grant_type="deposit")
    return {"connection_id": connection_id, **tokens}


def address_allowed(networks: list[str], address: str | None) -> bool:
    """True when the connection has no ranges, or ``address`` lies in one of them."""
    return address_in(parse_networks(networks), address)


def describe(row: dict[str, Any]) -> dict[str, Any]:
    """A connection's metadata; never the credential."""
    return {"connection_id": row["connection_id"], "subject": row["subject"],
            "upstream": row["upstream"], "scope": row["scope"],
            "allowed_ips": list(row["allowed_ips"]), "created_by": row["created_by"],
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def visible_to(client: Client, row: dict[str, Any] | None) -> dict[str, Any]:
    """A connection the client deposited or connected; anything else is not found."""
    if row is None or row["created_by"] != client.client_id:
        raise NotFound("no such connection")
    return row


def revoke_connection(provider: Provider, connection_id: str, reason: str,
                      delete: bool = True) -> None:
    """Revoke every token derived from the connection and (unless replaced) delete it."""
    expires_at = int(time.time()) + provider.revocation_horizon()
    provider.revocations.revoke_ids([(connection_id, expires_at)], reason)
    provider.storage.revoke_refresh_tokens(time.time(), connection_id=connection_id)
    if delete:
        provider.storage.delete_connection(connection_id)
