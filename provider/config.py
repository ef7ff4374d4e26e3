"""Every setting of the provider, documented and validated in one place.

Settings come from, in order of precedence (later wins):

1. the defaults below;
2. the TOML file named by ``PROVIDER_CONFIG`` (default ``instance/provider.toml``);
3. ``PROVIDER_*`` environment variables, for what differs per deployment;
4. ``test_config`` handed to :func:`provider.create_app` (tests only).

Validation fails fast: a bad setting raises :class:`ConfigError` whose message names it
(``tokens.leeway must be between 0 and 60``), and the command line prints that one line and
exits with status 2. Nothing is validated lazily at the first request.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message names it."""


ROLES = ("all", "web", "gateway")
ALGORITHMS = ("ES256", "RS256", "EdDSA")
_RATE = re.compile(r"^\s*([1-9][0-9]*)\s*/\s*(second|minute|hour)\s*$")
_RATE_SECONDS = {"second": 1, "minute": 60, "hour": 3600}
_ROUTE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TEMPLATE_SEGMENT = re.compile(r"^(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z0-9._~!$&'()*+,;=:@-]+)$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token


@dataclass(frozen=True)
class RateLimit:
    """``N/second|minute|hour``: at most ``count`` events in each ``period`` seconds."""

    count: int
    period: int

    @classmethod
    def parse(cls, text: str, name: str) -> RateLimit:
        match = _RATE.match(text) if isinstance(text, str) else None
        if not match:
            raise ConfigError(f'{name} must look like "600/minute" (N/second|minute|hour)')
        return cls(int(match.group(1)), _RATE_SECONDS[match.group(2)])

    def __str__(self) -> str:
        unit = {v: k for k, v in _RATE_SECONDS.items()}[self.period]
        return f"{self.count}/{unit}"


@dataclass(frozen=True)
class Tokens:
    access_token_ttl: int = 300
    """Seconds an access token lives unless its client has its own (``--token-ttl``)."""
    max_access_token_ttl: int = 3600
    """No access token lives longer, whatever a client or a request asks (RFC 9700 §2.2.1)."""
    refresh_token_ttl: int = 2592000
    """Seconds a refresh token family may be used after its last rotation."""
    max_exchange_depth: int = 5
    """A client_credentials or connect token is depth 0; each RFC 8693 exchange adds 1."""
    leeway: int = 30
    """Seconds of clock skew accepted on ``exp``, ``nbf`` and ``iat`` (RFC 8725 §3.10); at most 60."""
    max_request_bytes: int = 65536
    """Larger request bodies are refused with 413 before they are parsed."""


@dataclass(frozen=True)
class Keys:
    algorithm: str = "ES256"
    """JWS algorithm of new signing keys: ES256, RS256 or EdDSA (RFC 7518, RFC 8037)."""
    publish_delay: int = 0
    """Seconds a rotated key is published in JWKS before it starts signing."""


@dataclass(frozen=True)
class DPoP:
    require_nonce: bool = False
    """Ask every DPoP proof for a server nonce (RFC 9449 §8)."""
    iat_window: int = 60
    """Seconds a DPoP proof's ``iat`` may differ from now (RFC 9449 §11.1)."""


@dataclass(frozen=True)
class RateLimits:
    token: RateLimit = RateLimit(600, 60)
    """Requests per client at ``/token``."""
    introspect: RateLimit = RateLimit(6000, 60)
    """Requests per client at ``/introspect``."""
    failed_client_auth: RateLimit = RateLimit(10, 60)
    """Failed client authentications per source address, and per client id from one address."""
    gateway: RateLimit = RateLimit(600, 60)
    """Gateway calls per token family (all tokens exchanged from one root)."""
    suspend_gateway: RateLimit = RateLimit(6000, 60)
    """Gateway calls, refused or not, beyond which the token family is suspended."""
    clients: tuple[tuple[str, RateLimit], ...] = ()
    """``[rate_limits.clients]``: client id -> its own ``/token`` limit instead of ``token``."""
    enabled: bool = True
    """Turn every limit off (benchmarks only: the limits are the circuit breakers)."""


@dataclass(frozen=True)
class Audit:
    enabled: bool = True
    """Record audit events (log and store); off only to measure what they cost."""


@dataclass(frozen=True)
class Gateway:
    connect_timeout: float = 5.0
    """Seconds to reach the upstream."""
    read_timeout: float = 30.0
    """Seconds for the upstream to answer."""
    max_body_bytes: int = 10485760
    """Largest request body forwarded to an upstream."""


@dataclass(frozen=True)
class Alerts:
    webhook_url: str = ""
    """Where alerts are POSTed as JSON; empty: alerts are only logged and audited."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    scope: str


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    authorize_url: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    scopes: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    rate_limit: RateLimit | None = None
    """Gateway calls per connection; None: the same as ``rate_limits.gateway``."""
    suspend_rate_limit: RateLimit | None = None
    """Calls per connection beyond which it is suspended; None: ``rate_limits.suspend.gateway``."""


@dataclass(frozen=True)
class Settings:
    issuer: str = "http://127.0.0.1:8080"
    """``iss`` of every token and base of every metadata URL (``PROVIDER_ISSUER``)."""
    database_url: str = "sqlite:///instance/provider.db"
    """SQLAlchemy URL (``PROVIDER_DATABASE_URL``); ``postgresql+psycopg://…`` in production."""
    redis_url: str = ""
    """Shared cache for replay caches and rate limits (``PROVIDER_REDIS_URL``); empty: none."""
    keys_dir: str = "keys"
    """Signing keys, the vault key pair and the client-secret hash key (``PROVIDER_KEYS_DIR``)."""
    role: str = "all"
    """``web`` (deposit only), ``gateway`` (decrypts) or ``all`` (``PROVIDER_ROLE``)."""
    revocation_sync_interval: float = 0.25
    """Seconds between two reads of new revocations from the database; bounds how late
    another instance's revocation is honoured here."""
    tokens: Tokens = Tokens()
    keys: Keys = Keys()
    dpop: DPoP = DPoP()
    rate_limits: RateLimits = RateLimits()
    gateway: Gateway = Gateway()
    alerts: Alerts = Alerts()
    audit: Audit = Audit()
    upstreams: dict[str, Upstream] = field(default_factory=dict)

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"


_ENVIRONMENT = {
    "PROVIDER_ISSUER": "issuer",
    "PROVIDER_DATABASE_URL": "database_url",
    "PROVIDER_REDIS_URL": "redis_url",
    "PROVIDER_KEYS_DIR": "keys_dir",
    "PROVIDER_ROLE": "role",
}
_SECTIONS = {
    "tokens": Tokens,
    "keys": Keys,
    "dpop": DPoP,
    "gateway": Gateway,
    "alerts": Alerts,
    "audit": Audit,
}


def load(
    path: str | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build validated settings from defaults, the TOML file, the environment and overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("PROVIDER_CONFIG") or "instance/provider.toml"
    document: dict[str, Any] = {}
    config_file = Path(path)
    if config_file.exists():
        try:
            document = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    elif "PROVIDER_CONFIG" in environ:
        raise ConfigError(f"PROVIDER_CONFIG names {path}, which does not exist: run token-provider init")
    for variable, name in _ENVIRONMENT.items():
        if environ.get(variable):
            document[name] = environ[variable]
    for name, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(document.get(name), dict):
            document[name] = {**document[name], **value}
        else:
            document[name] = value
    return _build(document)


def _build(document: dict[str, Any]) -> Settings:
    top = {f.name for f in fields(Settings)}
    unknown = sorted(set(document) - top)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a setting")
    values: dict[str, Any] = {}
    for name in ("issuer", "database_url", "redis_url", "keys_dir", "role"):
        if name in document:
            values[name] = _string(document[name], name)
    if "revocation_sync_interval" in document:
        values["revocation_sync_interval"] = _number(
            document["revocation_sync_interval"], "revocation_sync_interval", 0, 1
        )
    for section, cls in _SECTIONS.items():
        values[section] = _section(cls, document.get(section, {}), section)
    values["rate_limits"] = _rate_limits(document.get("rate_limits", {}))
    values["upstreams"] = {
        name: _upstream(name, table) for name, table in _table(
            document.get("upstreams", {}), "upstreams").items()
    }
    settings = Settings(**values)
    _validate(settings)
    return settings


def _table(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table")
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string")
    return value


def _number(value: Any, name: str, low: float, high: float, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}")
    return value


def _section(cls: type, table: Any, section: str) -> Any:
    table = _table(table, section)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting")
    default = cls()
    values = {}
    for key, value in table.items():
        expected = type(getattr(default, key))
        name = f"{section}.{key}"
        if expected is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false")
        elif expected is str:
            _string(value, name)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number")
        elif expected is int and not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer")
        values[key] = value
    return replace(default, **values)


def _rate_limits(table: Any) -> RateLimits:
    table = _table(table, "rate_limits")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "suspend":
            for sub_key, sub_value in _table(value, "rate_limits.suspend").items():
                if sub_key != "gateway":
                    raise ConfigError(f"rate_limits.suspend.{sub_key} is not a setting")
                values["suspend_gateway"] = RateLimit.parse(sub_value, "rate_limits.suspend.gateway")
            continue
        if key == "clients":
            clients = _table(value, "rate_limits.clients")
            for client_id in clients:
                if not re.match(r"^[\x21-\x7e]{1,255}$", client_id):
                    raise ConfigError(f"rate_limits.clients: {client_id!r} is not a client id")
            values["clients"] = tuple(
                (client_id, RateLimit.parse(limit, f"rate_limits.clients.{client_id}"))
                for client_id, limit in sorted(clients.items())
            )
            continue
        if key == "enabled":
            if not isinstance(value, bool):
                raise ConfigError("rate_limits.enabled must be true or false")
            values["enabled"] = value
            continue
        if key not in {"token", "introspect", "failed_client_auth", "gateway"}:
            raise ConfigError(f"rate_limits.{key} is not a setting")
        values[key] = RateLimit.parse(value, f"rate_limits.{key}")
    return replace(RateLimits(), **values)


def _upstream(name: str, table: Any) -> Upstream:
    where = f"upstreams.{name}"
    if not _UPSTREAM_NAME.match(name):
        raise ConfigError(f"{where}: an upstream name is 1-63 of a-z, 0-9, '-' and '_'")
    table = dict(_table(table, where))
    known = {"base_url", "authorize_url", "token_url", "client_id", "client_secret",
             "client_secret_env", "scopes", "routes", "rate_limit", "suspend_rate_limit"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a setting")
    if "base_url" not in table:
        raise ConfigError(f"{where}.base_url is required")
    for key in ("base_url", "authorize_url", "token_url"):
        if key in table:
            _http_url(_string(table[key], f"{where}.{key}"), f"{where}.{key}")
    secret = _string(table.get("client_secret", ""), f"{where}.client_secret")
    if "client_secret_env" in table:
        variable = _string(table["client_secret_env"], f"{where}.client_secret_env")
        secret = os.environ.get(variable, "")
        if not secret:
            raise ConfigError(f"{where}.client_secret_env names {variable}, which is not set")
    scopes = table.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{where}.scopes must be a list of strings")
    routes_table = table.get("routes", [])
    if not isinstance(routes_table, list):
        raise ConfigError(f"{where}.routes must be an array of tables ([[{where}.routes]])")
    routes = tuple(_route(f"{where}.routes[{i}]", r) for i, r in enumerate(routes_table))
    return Upstream(
        name=name,
        base_url=table["base_url"].rstrip("/"),
        authorize_url=table.get("authorize_url", ""),
        token_url=table.get("token_url", ""),
        client_id=_string(table.get("client_id", ""), f"{where}.client_id"),
        client_secret=secret,
        scopes=tuple(scopes),
        routes=routes,
        **{key: RateLimit.parse(table[key], f"{where}.{key}")
           for key in ("rate_limit", "suspend_rate_limit") if key in table},
    )


def _route(where: str, table: Any) -> Route:
    table = _table(table, where)
    unknown = sorted(set(table) - {"method", "path", "scope"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a setting")
    method = _string(table.get("method", ""), f"{where}.method").upper()
    if method not in _ROUTE_METHODS:
        raise ConfigError(f"{where}.method must be one of {', '.join(_ROUTE_METHODS)}")
    path = _string(table.get("path", ""), f"{where}.path")
    segments = path.split("/")
    if not path.startswith("/") or not all(
        _TEMPLATE_SEGMENT.match(s) and s not in (".", "..") for s in segments[1:]
    ):
        raise ConfigError(f"{where}.path must be /segment/{{name}}/... without empty or dot segments")
    scope = _string(table.get("scope", ""), f"{where}.scope")
    if not _SCOPE_TOKEN.match(scope):
        raise ConfigError(f"{where}.scope must be one scope token")
    return Route(method=method, path=path, scope=scope)


def _http_url(value: str, name: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
        raise ConfigError(f"{name} must be an absolute http(s) URL without a fragment")


def _validate(s: Settings) -> None:
    _http_url(s.issuer, "issuer")
    if urlsplit(s.issuer).query or s.issuer.endswith("/"):
        raise ConfigError("issuer must have no query and no trailing slash (RFC 8414 §2)")
    if s.role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}")
    if not s.database_url:
        raise ConfigError("database_url must be set")
    if s.redis_url and urlsplit(s.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis_url must be a redis://, rediss:// or unix:// URL")
    t = s.tokens
    _number(t.access_token_ttl, "tokens.access_token_ttl", 1, t.max_access_token_ttl)
    _number(t.max_access_token_ttl, "tokens.max_access_token_ttl", 1, 86400)
    _number(t.refresh_token_ttl, "tokens.refresh_token_ttl", 60, 31536000)
    _number(t.max_exchange_depth, "tokens.max_exchange_depth", 0, 20)
    _number(t.leeway, "tokens.leeway", 0, 60)
    _number(t.max_request_bytes, "tokens.max_request_bytes", 1024, 1048576)
    if s.keys.algorithm not in ALGORITHMS:
        raise ConfigError(f"keys.algorithm must be one of {', '.join(ALGORITHMS)}")
    _number(s.keys.publish_delay, "keys.publish_delay", 0, 7 * 86400)
    _number(s.dpop.iat_window, "dpop.iat_window", 1, 600)
    _number(s.gateway.connect_timeout, "gateway.connect_timeout", 0.1, 120)
    _number(s.gateway.read_timeout, "gateway.read_timeout", 0.1, 600)
    _number(s.gateway.max_body_bytes, "gateway.max_body_bytes", 0, 1 << 30)
    if s.alerts.webhook_url:
        _http_url(s.alerts.webhook_url, "alerts.webhook_url")


def address_in(networks: tuple[Any, ...], address: str | None) -> bool:
    """True when no ranges are set, or ``address`` lies in one of them (an unparsable address
    lies in none)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in networks)


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[
        ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse CIDR ranges such as ``10.0.0.0/8``; a bare address is a one-address range."""
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


DEFAULT_FILE = '''\
# token-provider configuration. Every setting is shown with its default;
# provider/config.py documents each one. PROVIDER_* environment variables win
# over this file (PROVIDER_ISSUER, PROVIDER_DATABASE_URL, PROVIDER_REDIS_URL,
# PROVIDER_KEYS_DIR, PROVIDER_ROLE).

[tokens]
access_token_ttl = 300          # seconds; a client may have its own (--token-ttl)
max_access_token_ttl = 3600     # no token lives longer
refresh_token_ttl = 2592000
max_exchange_depth = 5          # a client_credentials/connect token is depth 0; each exchange adds 1
leeway = 30                     # seconds of clock skew accepted on exp/nbf/iat; at most 60
max_request_bytes = 65536

[keys]
algorithm = "ES256"             # ES256, RS256 or EdDSA
publish_delay = 0               # seconds a rotated key is in JWKS before it signs

[dpop]
require_nonce = false
iat_window = 60                 # seconds a proof's iat may differ from now

[rate_limits]                   # "N/second|minute|hour"; per client unless said
token = "600/minute"
introspect = "6000/minute"
failed_client_auth = "10/minute"  # per source address, and per client id from one address
gateway = "600/minute"          # per token family (all tokens exchanged from one root)

[rate_limits.suspend]           # calls beyond these, refused or not, suspend the family
gateway = "6000/minute"

# [rate_limits.clients]         # a client's own /token limit instead of rate_limits.token
# "batch-client" = "60/minute"

[gateway]
connect_timeout = 5             # seconds to reach the upstream
read_timeout = 30               # seconds for the upstream to answer
max_body_bytes = 10485760

[alerts]
webhook_url = ""                # alerts (suspensions) are POSTed here as JSON, never blocking

[audit]
enabled = true                  # audit events to the log and the store; off only to measure their cost

# One table per upstream, for example:
# [upstreams.drive]
# base_url = "https://upstream.example/api"
# authorize_url = "https://upstream.example/authorize"
# token_url = "https://upstream.example/token"
# client_id = "provider-at-upstream"
# client_secret_env = "DRIVE_CLIENT_SECRET"   # or client_secret = "..." for development
# scopes = ["files.read"]         # upstream scopes asked for in the connect flow
# rate_limit = "600/minute"       # per connection; default: rate_limits.gateway
# suspend_rate_limit = "6000/minute"  # suspends the connection; default: rate_limits.suspend.gateway
# [[upstreams.drive.routes]]
# method = "GET"
# path = "/files/{id}"            # {name} matches exactly one path segment
# scope = "files:read"            # internal scope a call needs
'''
