"""Liveness and readiness."""

from __future__ import annotations

import logging

from flask import Blueprint

from provider.views import json_response, provider

bp = Blueprint("health", __name__)
log = logging.getLogger("provider.health")


@bp.get("/healthz")
def healthz():
    """200 when the database, Redis (if configured) and a signing key are usable; else 503."""
    p = provider()
    checks = {}
    for name, check in (("database", p.storage.ping), ("keys", p.keys.signer),
                        ("redis", p.redis.ping if p.redis is not None else None)):
        if check is None:
            checks[name] = "unused"
            continue
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure makes the instance unready.
            log.warning("readiness check %s failed: %s", name, type(exc).__name__)
            checks[name] = "failing"
    ready = all(v in ("ok", "unused") for v in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return json_response(body, 200 if ready else 503)
