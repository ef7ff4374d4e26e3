"""Scope (RFC 6749 §3.3) and resource (RFC 8707) containment.

Exchange may only narrow: every requested scope must be one the subject token has, and every
requested resource must equal or lie under an audience the subject token carries, compared on
whole path segments (``/v1`` does not cover ``/v10``). Resources are refused, never "fixed",
when their meaning could differ between us and the server that receives them: dot segments,
empty segments, encoded slashes, backslashes, encoded dots, queries and fragments.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import urlsplit

_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
# Percent-encodings that would change which segments a path has once decoded.
_FORBIDDEN_ESCAPES = {"%2f", "%5c", "%2e", "%00"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_RESOURCE_LENGTH = 2048


def parse_scope(value: str | None) -> tuple[str, ...] | None:
    """Space-separated scope-tokens, in order, duplicates dropped; None when malformed."""
    if value is None:
        return ()
    tokens = value.split(" ")
    if not all(_SCOPE_TOKEN.match(t) for t in tokens):
        return None
    return tuple(dict.fromkeys(tokens))


def format_scope(scopes: tuple[str, ...] | list[str]) -> str:
    return " ".join(scopes)


def is_subset(requested: tuple[str, ...], granted: tuple[str, ...] | str) -> bool:
    if isinstance(granted, str):
        granted = tuple(granted.split())
    return set(requested) <= set(granted)


@functools.lru_cache(maxsize=4096)
def normalize_resource(value: str) -> str | None:
    """The canonical form of an absolute http(s) resource URI, or None if it is refused.

    Scheme and host are lower-cased and a default port dropped (RFC 3986 §6.2.2-6.2.3); an
    empty path becomes ``/``. Nothing else is rewritten: anything ambiguous is refused.
    """
    if not value or len(value) > MAX_RESOURCE_LENGTH or "\\" in value:
        return None
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.query or parts.fragment or "#" in value or "?" in value or parts.username:
        return None
    if "%" in parts.path:
        escapes = _PERCENT.findall(parts.path)
        if parts.path.count("%") != len(escapes):
            return None
        if any(e.lower() in _FORBIDDEN_ESCAPES for e in escapes):
            return None
    path = parts.path or "/"
    segments = path.split("/")[1:]
    # A dot segment with path parameters ("..;x") is a dot segment to servers that strip them.
    if any(s.split(";", 1)[0] in (".", "..") for s in segments) or "" in segments[:-1]:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def resource_covers(granted: str, requested: str) -> bool:
    """True when ``requested`` equals ``granted`` or lies under it on whole segments.

    Both are normalised first; a value that does not normalise covers nothing and is
    covered by nothing.
    """
    outer = normalize_resource(granted)
    inner = normalize_resource(requested)
    if outer is None or inner is None:
        return False
    if inner == outer:
        return True
    prefix = outer if outer.endswith("/") else outer + "/"
    return inner.startswith(prefix)


def covered_by_any(granted: list[str], requested: str) -> bool:
    return any(resource_covers(g, requested) for g in granted)
