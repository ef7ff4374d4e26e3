"""Liveness and readiness: one route, two probes.

Readiness (``GET /healthz``, or ``?probe=ready``) checks the database, Redis (if configured)
and a signing key: a load balancer sends no traffic to an instance that cannot serve it.
Liveness (``?probe=live``) checks nothing but that the process answers: a probe that restarts
what fails it must not restart every instance because the database or Redis is away.
"""

from __future__ import annotations

import logging

from flask import Blueprint, request

from provider.errors import InvalidRequest
from provider.views import json_response, provider

bp = Blueprint("health", __name__)
log = logging.getLogger("provider.health")
PROBES = ("ready", "live")


@bp.get("/healthz")
def healthz():
    """Readiness: 200 when the database, Redis (if configured) and a signing key are usable,
    else 503 naming what failed. Liveness: 200."""
    probes = request.args.getlist("probe")
    if len(probes) > 1 or (probes and probes[0] not in PROBES):
        raise InvalidRequest("probe must be given at most once, as live or ready")
    if probes == ["live"]:
        return json_response({"status": "ok"})
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
