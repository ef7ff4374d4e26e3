"""Thin blueprints: parse the request, call one protocol function, render the answer."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, json

from provider.service import Provider


def provider() -> Provider:
    return current_app.extensions["provider"]


def json_response(body: Any, status: int = 200, *, no_store: bool = True):
    """JSON with ``Cache-Control: no-store`` (RFC 6749 §5.1) unless said otherwise."""
    response = current_app.response_class(json.dumps(body), status=status,
                                          mimetype="application/json")
    if no_store:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    return response


def register(app: Flask) -> None:
    from provider.views import connect, connections, gateway, health, oauth, wellknown

    for module in (oauth, connections, connect, gateway, wellknown, health):
        app.register_blueprint(module.bp)
