"""The gateway bench's upstream: a trivial WSGI app that must never be the bottleneck.

Both the provider's ``/gateway/bench/...`` and the baseline's direct handler call it. It checks
that the request carries the upstream token (``Authorization: Bearer $BENCH_UPSTREAM_TOKEN``,
so a gateway that forwarded the wrong credential would show up as non-2xx answers) and answers
a small fixed JSON body with a Content-Length. No framework: a plain WSGI callable.

Served by gunicorn with one ``gthread`` worker (see ``bench.gateway``): unlike sync workers,
it keeps connections alive, as an upstream API would, so that the callers' pooled connections
are reused rather than reopened for every call.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from typing import Any

_EXPECTED = f"Bearer {os.environ['BENCH_UPSTREAM_TOKEN']}".encode("latin-1")
_BODY = b'{"ok": true, "id": "1", "name": "bench item"}'
_REFUSED = b'{"error": "invalid_token"}'


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    presented = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
    if environ.get("PATH_INFO") == "/healthz":
        status, body = "200 OK", b"{}"
    elif hmac.compare_digest(presented, _EXPECTED):
        status, body = "200 OK", _BODY
    else:
        status, body = "401 Unauthorized", _REFUSED
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]
