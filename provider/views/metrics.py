"""``GET /metrics``: Prometheus text format (see provider/metrics.py for multiprocess mode)."""

from __future__ import annotations

from flask import Blueprint, current_app

from provider.metrics import render

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    body, content_type = render()
    response = current_app.response_class(body, status=200, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response
