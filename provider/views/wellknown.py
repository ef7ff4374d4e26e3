"""Published metadata: JWKS (RFC 7517), server metadata (RFC 8414) and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, current_app

from provider.clients import AUTH_METHODS
from provider.dpop import ALGORITHMS as DPOP_ALGORITHMS
from provider.grants import GRANTS
from provider.views import json_response, provider

bp = Blueprint("wellknown", __name__)
OPENAPI = Path(__file__).resolve().parents[2] / "openapi.yaml"
ASSERTION_ALGORITHMS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512",
                        "PS256", "PS384", "PS512", "EdDSA"]


@bp.get("/.well-known/jwks.json")
def jwks():
    response = json_response(provider().keys.jwks(), no_store=False)
    response.mimetype = "application/jwk-set+json"
    # Short enough that a rotated key is fetched well before it signs (keys.publish_delay).
    response.headers["Cache-Control"] = "public, max-age=60"
    return response


@bp.get("/.well-known/oauth-authorization-server")
def metadata():
    issuer = provider().settings.issuer
    auth = {"methods": list(AUTH_METHODS), "algorithms": ASSERTION_ALGORITHMS}
    body = {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "introspection_endpoint": f"{issuer}/introspect",
        "revocation_endpoint": f"{issuer}/revoke",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "grant_types_supported": sorted(GRANTS),
        "response_types_supported": [],
        "scopes_supported": [],
        "token_endpoint_auth_methods_supported": auth["methods"],
        "token_endpoint_auth_signing_alg_values_supported": auth["algorithms"],
        "introspection_endpoint_auth_methods_supported": auth["methods"],
        "introspection_endpoint_auth_signing_alg_values_supported": auth["algorithms"],
        "revocation_endpoint_auth_methods_supported": auth["methods"],
        "revocation_endpoint_auth_signing_alg_values_supported": auth["algorithms"],
        "code_challenge_methods_supported": ["S256"],
        "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
        "service_documentation": f"{issuer}/openapi.yaml",
    }
    response = json_response(body, no_store=False)
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


@bp.get("/openapi.yaml")
def openapi():
    return current_app.response_class(OPENAPI.read_bytes(), mimetype="application/yaml")
