"""openapi.yaml is the provider's HTTP contract: it must be a valid OpenAPI 3.1 document, be what
``GET /openapi.yaml`` serves, describe exactly the routes the app has, and describe every answer
the app really gives, successes and errors alike.

Three layers: a table of real requests whose responses openapi-core validates against the
document; schemathesis generating requests from the document and checking each answer (no 5xx,
documented status, content type, headers and body); and regression tests for the provider bugs
this comparison exposed. The vault, the connect flow, the refresh token and authorization code
grants and the gateway are driven against the fake upstream of :mod:`tests.upstream`, in
:class:`TestVaultConnectAndGateway`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
import schemathesis
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_core import Config, OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_core.testing import MockRequest
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from werkzeug.test import EnvironBuilder

from tests.support import (
    ACCESS_TOKEN_TYPE,
    EXCHANGE,
    FORM,
    JWT_TOKEN_TYPE,
    REFRESH_TOKEN_TYPE,
    OAuth,
    Registered,
)
from tests.upstream import FakeUpstream, pkce

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
API = "https://api.example/v1"
OTHER_API = "https://other.example/"
TOO_LARGE = "token=" + "x" * 70_000  # over the default tokens.max_request_bytes (65536)
# Flask registers /static/<filename> by itself; there is no static folder, so it only ever 404s.
FRAMEWORK_ROUTES = {"static"}
HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
# RFC 9110 methods OpenAPI 3.1 has no operation for; a path item that serves one says so.
UNDESCRIBABLE_METHODS = {"CONNECT"}
# A Flask rule variable, with or without a converter: <upstream>, <path:path>.
RULE_VARIABLE = re.compile(r"<(?:([^<>:]+):)?([^<>:]+)>")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    config = Config(extra_media_type_deserializers={
        "application/jwk-set+json": json.loads,  # RFC 7517 §8.5: JSON
        "application/yaml": yaml.safe_load,
        "text/html": bytes.decode,  # the page of a 303
    })
    return OpenAPI.from_path(OPENAPI_PATH, config=config)


def component_validator(document: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A JSON Schema validator for ``#/components/...`` (for answers no operation describes)."""
    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(document))
    return Draft202012Validator({"$ref": f"urn:openapi#{pointer}"}, registry=registry)


# ---- the document itself --------------------------------------------------------------------


def test_the_document_is_a_valid_openapi_3_1_description(document):
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_get_openapi_yaml_serves_the_file_byte_for_byte(client):
    response = client.get("/openapi.yaml")
    assert response.status_code == 200
    assert response.mimetype == "application/yaml"
    assert response.data == OPENAPI_PATH.read_bytes()


def documented_path(rule: str) -> str:
    """The document's path for a Flask rule: ``/gateway/<upstream>/<path:path>`` is
    ``/gateway/{upstream}/{path}``. (OpenAPI has no multi-segment parameter: the ``path``
    parameter's description says that it spans segments.)"""
    return RULE_VARIABLE.sub(r"{\2}", rule)


def served_methods(rule: Any) -> set[str]:
    """The methods a rule's view answers itself. For most rules the framework answers OPTIONS,
    and HEAD as GET without a body; a rule that lists OPTIONS itself (the gateway) hands every
    method, HEAD included, to its view, which forwards it."""
    if rule.provide_automatic_options:
        return set(rule.methods) - {"HEAD", "OPTIONS"}
    return set(rule.methods)


def test_the_document_describes_exactly_the_routes_the_app_serves(app, document):
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in FRAMEWORK_ROUTES:
            continue
        path = documented_path(rule.rule)
        for method in served_methods(rule):
            if method in UNDESCRIBABLE_METHODS:
                assert method in document["paths"].get(path, {}).get("description", ""), (method, path)
                continue
            served.add((method.lower(), path))
    described = {(method, path) for path, item in document["paths"].items()
                 for method in item if method in HTTP_METHODS}
    assert described == served


def test_rule_variables_are_the_documented_path_parameters(app, document):
    """Each ``<name>`` of a rule is a required path parameter ``name``; a ``<path:...>`` one
    (several segments) says so in its description."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint in FRAMEWORK_ROUTES:
            continue
        item = document["paths"][documented_path(rule.rule)]
        for method in served_methods(rule) - UNDESCRIBABLE_METHODS:
            parameters = {}
            for parameter in item.get("parameters", []) + item[method.lower()].get("parameters", []):
                if "$ref" in parameter:
                    parameter = document["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
                if parameter["in"] == "path":
                    parameters[parameter["name"]] = parameter
            variables = RULE_VARIABLE.findall(rule.rule)
            assert set(parameters) == {name for _, name in variables}, (rule.rule, method)
            for converter, name in variables:
                assert parameters[name]["required"] is True
                if converter == "path":
                    assert "segments" in parameters[name]["description"], (rule.rule, name)


def test_every_operation_has_an_id_a_tag_a_description_and_error_answers(document):
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                assert method in ("parameters", "description"), (method, path)
                continue
            operation_ids.append(operation["operationId"])
            assert operation["tags"], (method, path)
            assert operation.get("description") or operation.get("summary"), (method, path)
            assert "500" in operation["responses"], (method, path)
            for status, answer in operation["responses"].items():
                assert "$ref" in answer or "X-Request-Id" in answer["headers"], (method, path, status)
    assert len(operation_ids) == len(set(operation_ids))


# ---- real requests, validated by openapi-core ----------------------------------------------


class World:
    """The clients every scenario may use, registered on a fresh provider."""

    def __init__(self, oauth: OAuth):
        self.oauth = oauth
        self.http = oauth.http
        self.svc = oauth.register("svc", audiences=[API, OTHER_API])
        self.narrow = oauth.register("narrow", ("client_credentials",), "read",
                                     audiences=[API])
        self.other = oauth.register("other", audiences=[API])
        # may_act names svc, so the actor's tokens are meant for svc (RFC 8693 §4.4).
        self.actor = oauth.register("actor", audiences=[API], may_act="svc")
        self.poster = oauth.register("poster", ("client_credentials",), "read",
                                     auth_method="client_secret_post")
        self.bound = oauth.register("bound", ("client_credentials",), "read",
                                    allowed_ips=["10.0.0.0/8"])
        self.rs = oauth.register("rs", ("client_credentials",), "introspect", introspect=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.signer = oauth.register("signer", ("client_credentials",), "read",
                                     auth_method="private_key_jwt",
                                     jwks={"keys": [{**public, "kid": "k1", "alg": "ES256"}]})

    def assertion(self, jti: str | None = None, client_id: str = "signer") -> dict[str, str]:
        now = int(time.time())
        claims = {"iss": client_id, "sub": client_id, "aud": "http://localhost/token",
                  "iat": now, "exp": now + 60, "jti": jti or uuid.uuid4().hex}
        token = jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k1"})
        return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": token}

    def token(self, client: Registered | None = None, **params: Any) -> str:
        return self.oauth.access_token(client or self.svc, **params)

    def post(self, path: str, client: Registered | None, data: Any, **kwargs: Any):
        return self.oauth.post(path, client, data, **kwargs)

    def fail_with(self, monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> None:
        def broken(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("simulated outage")

        monkeypatch.setattr(target, name, broken)


@pytest.fixture
def world(oauth: OAuth) -> World:
    return World(oauth)


Scenario = Callable[[World, pytest.MonkeyPatch], Any]

SUCCESSES: list[tuple[str, int, Scenario]] = [
    ("client_credentials with client_secret_basic", 200,
     lambda w, m: w.oauth.token(w.svc)),
    ("client_credentials narrowed by scope, audience and resource", 200,
     lambda w, m: w.post("/token", w.svc, {"grant_type": "client_credentials", "scope": "read write",
                                           "audience": [API], "resource": [API + "/files"]})),
    ("client_credentials with client_secret_post", 200,
     lambda w, m: w.post("/token", None, {"grant_type": "client_credentials", "client_id": "poster",
                                          "client_secret": w.poster.secret})),
    ("client_credentials with private_key_jwt", 200,
     lambda w, m: w.post("/token", None, {"grant_type": "client_credentials", **w.assertion()})),
    ("token exchange narrowing scope and resource", 200,
     lambda w, m: w.oauth.exchange(w.svc, w.token(), scope="read", resource=API + "/files/1")),
    ("token exchange with an actor token, issuing a jwt token type", 200,
     lambda w, m: w.oauth.exchange(w.svc, w.token(), actor_token=w.token(w.actor),
                                   actor_token_type=ACCESS_TOKEN_TYPE, audience=[API],
                                   requested_token_type=JWT_TOKEN_TYPE)),
    ("introspection of an active token", 200,
     lambda w, m: w.post("/introspect", w.rs, {"token": w.token()})),
    ("introspection of an exchanged token with act and one audience", 200,
     lambda w, m: w.post("/introspect", w.rs, {"token": w.oauth.exchanged(
         w.svc, w.token(), actor_token=w.token(w.actor), actor_token_type=ACCESS_TOKEN_TYPE,
         audience=API)})),
    ("introspection of garbage", 200,
     lambda w, m: w.post("/introspect", w.rs, {"token": "not-a-token", "token_type_hint": "access_token"})),
    ("introspection of a revoked token", 200,
     lambda w, m: (lambda t: (w.oauth.revoke(w.svc, t), w.post("/introspect", w.rs, {"token": t}))[1])(
         w.token())),
    ("revocation of an own token", 200,
     lambda w, m: w.oauth.revoke(w.svc, w.token())),
    ("revocation of an unknown token", 200,
     lambda w, m: w.oauth.revoke(w.svc, "unknown", token_type_hint="refresh_token")),
    ("jwks", 200, lambda w, m: w.http.get("/.well-known/jwks.json")),
    ("authorization server metadata", 200,
     lambda w, m: w.http.get("/.well-known/oauth-authorization-server")),
    ("healthz when ready", 200, lambda w, m: w.http.get("/healthz")),
    ("healthz when the database is down", 503,
     lambda w, m: (w.fail_with(m, w.oauth.provider.storage, "ping"), w.http.get("/healthz"))[1]),
    ("healthz liveness while the database is down", 200,
     lambda w, m: (w.fail_with(m, w.oauth.provider.storage, "ping"),
                   w.http.get("/healthz?probe=live"))[1]),
    ("the openapi document", 200, lambda w, m: w.http.get("/openapi.yaml")),
    ("metrics", 200, lambda w, m: w.http.get("/metrics")),
]

ERRORS: list[tuple[str, int, str, Scenario]] = [
    ("healthz with an unknown probe", 400, "invalid_request",
     lambda w, m: w.http.get("/healthz?probe=alive")),
    # 401 invalid_client, whichever method was used
    ("no client authentication", 401, "invalid_client",
     lambda w, m: w.post("/token", None, {"grant_type": "client_credentials"})),
    ("wrong secret", 401, "invalid_client",
     lambda w, m: w.post("/token", Registered("svc", "wrong"), {"grant_type": "client_credentials"})),
    ("unknown client", 401, "invalid_client",
     lambda w, m: w.post("/token", Registered("nobody", "x"), {"grant_type": "client_credentials"})),
    ("a Bearer authorization header", 401, "invalid_client",
     lambda w, m: w.post("/token", None, {"grant_type": "client_credentials"},
                         headers={"Authorization": "Bearer abc"})),
    ("client_secret_post client using basic", 401, "invalid_client",
     lambda w, m: w.post("/token", w.poster, {"grant_type": "client_credentials"})),
    ("basic client id differing from the body client_id", 401, "invalid_client",
     lambda w, m: w.post("/token", w.svc, {"grant_type": "client_credentials", "client_id": "other"})),
    ("client bound to other addresses", 401, "invalid_client",
     lambda w, m: w.post("/token", w.bound, {"grant_type": "client_credentials"})),
    ("replayed client assertion", 401, "invalid_client",
     lambda w, m: [w.post("/token", None, {"grant_type": "client_credentials", **w.assertion("once")})
                   for _ in range(2)][1]),
    ("garbage client assertion", 401, "invalid_client",
     lambda w, m: w.post("/introspect", None, {"token": "t", "client_assertion_type": ASSERTION_TYPE,
                                               "client_assertion": "a.b.c"})),
    ("unauthenticated introspection", 401, "invalid_client",
     lambda w, m: w.post("/introspect", None, {"token": "t"})),
    ("unauthenticated revocation", 401, "invalid_client",
     lambda w, m: w.post("/revoke", Registered("rs", "wrong"), {"token": "t"})),
    # 400 invalid_request
    ("a json body", 400, "invalid_request",
     lambda w, m: w.http.post("/token", json={"grant_type": "client_credentials"}, headers=w.svc.basic)),
    ("a body that is not utf-8", 400, "invalid_request",
     lambda w, m: w.post("/token", w.svc, b"grant_type=client_credentials&scope=\xff",
                         content_type=FORM)),
    ("a repeated parameter", 400, "invalid_request",
     lambda w, m: w.post("/token", w.svc, [("grant_type", "client_credentials"), ("scope", "read"),
                                           ("scope", "write")])),
    ("missing grant_type", 400, "invalid_request",
     lambda w, m: w.post("/token", w.svc, {"scope": "read"})),
    ("two client authentication methods", 400, "invalid_request",
     lambda w, m: w.post("/token", w.svc, {"grant_type": "client_credentials", "client_id": "svc",
                                           "client_secret": w.svc.secret})),
    ("wrong client_assertion_type", 400, "invalid_request",
     lambda w, m: w.post("/token", None, {"grant_type": "client_credentials",
                                          **w.assertion(), "client_assertion_type": "jwt"})),
    ("too long a scope", 400, "invalid_request",
     lambda w, m: w.oauth.token(w.svc, scope="a" * 1025)),
    ("exchange without subject_token", 400, "invalid_request",
     lambda w, m: w.post("/token", w.svc, {"grant_type": EXCHANGE, "subject_token_type": ACCESS_TOKEN_TYPE})),
    ("exchange of an invalid subject token", 400, "invalid_request",
     lambda w, m: w.oauth.exchange(w.svc, "not-a-token")),
    ("exchange of another client's token", 400, "invalid_request",
     lambda w, m: w.oauth.exchange(w.svc, w.token(w.narrow))),
    ("exchange with an unsupported subject_token_type", 400, "invalid_request",
     lambda w, m: w.oauth.exchange(w.svc, w.token(), subject_token_type="urn:example:saml")),
    ("exchange with a refresh_token subject_token_type", 400, "invalid_request",
     lambda w, m: w.oauth.exchange(w.svc, w.token(),
                                   subject_token_type="urn:ietf:params:oauth:token-type:refresh_token")),
    ("exchange with actor_token but no actor_token_type", 400, "invalid_request",
     lambda w, m: w.oauth.exchange(w.svc, w.token(), actor_token=w.token(w.actor))),
    ("introspection without token", 400, "invalid_request",
     lambda w, m: w.post("/introspect", w.rs, {"token_type_hint": "access_token"})),
    ("revocation without token", 400, "invalid_request",
     lambda w, m: w.post("/revoke", w.svc, {"token_type_hint": "access_token"})),
    # 400, other codes
    ("an unsupported grant type", 400, "unsupported_grant_type",
     lambda w, m: w.post("/token", w.svc, {"grant_type": "password"})),
    ("a grant the client is not registered for", 400, "unauthorized_client",
     lambda w, m: w.oauth.exchange(w.narrow, w.token(w.narrow))),
    ("revoking another client's token", 400, "unauthorized_client",
     lambda w, m: w.oauth.revoke(w.other, w.token())),
    ("a scope beyond the client's", 400, "invalid_scope",
     lambda w, m: w.oauth.token(w.narrow, scope="read write")),
    ("exchange asking for more scope", 400, "invalid_scope",
     lambda w, m: w.oauth.exchange(w.svc, w.token(scope="read"), scope="write")),
    ("a malformed scope", 400, "invalid_scope",
     lambda w, m: w.oauth.token(w.svc, scope='read "write"')),
    ("a resource outside the audience", 400, "invalid_target",
     lambda w, m: w.oauth.token(w.narrow, resource="https://api.example/v10")),
    ("exchange with an audience the subject lacks", 400, "invalid_target",
     lambda w, m: w.oauth.exchange(w.svc, w.token(audience=API), audience=OTHER_API)),
    ("a resource with dot segments", 400, "invalid_target",
     lambda w, m: w.oauth.exchange(w.svc, w.token(), resource=API + "/a/../b")),
    # 403, 413, 500, 503
    ("introspection by a client without --introspect", 403, "unauthorized_client",
     lambda w, m: w.post("/introspect", w.svc, {"token": "t"})),
    ("a token request body too large", 413, "invalid_request",
     lambda w, m: w.post("/token", w.svc, TOO_LARGE, content_type=FORM)),
    ("an introspection body too large", 413, "invalid_request",
     lambda w, m: w.post("/introspect", w.rs, TOO_LARGE, content_type=FORM)),
    ("a revocation body too large", 413, "invalid_request",
     lambda w, m: w.post("/revoke", w.svc, TOO_LARGE, content_type=FORM)),
    ("an unexpected failure while signing", 500, "server_error",
     lambda w, m: (w.fail_with(m, w.oauth.provider.keys, "signer"), w.oauth.token(w.svc))[1]),
    ("an unexpected failure reading clients", 500, "server_error",
     lambda w, m: (w.fail_with(m, w.oauth.provider.clients, "get"),
                   w.post("/revoke", w.svc, {"token": "t"}))[1]),
    ("the replay cache down during private_key_jwt", 503, "temporarily_unavailable",
     lambda w, m: (w.fail_with(m, w.oauth.provider.storage, "claim_once"),
                   w.post("/token", None, {"grant_type": "client_credentials", **w.assertion()}))[1]),
    ("the replay cache down during introspection", 503, "temporarily_unavailable",
     lambda w, m: (w.fail_with(m, w.oauth.provider.storage, "claim_once"),
                   w.post("/introspect", None, {"token": "t", **w.assertion()}))[1]),
]


GATEWAY_CALL = re.compile(r"^(/gateway/[^/]+/)(.+)$")


def path_as_documented(path: str) -> str:
    """openapi-core matches a path parameter within one segment (``[^/]*``); the gateway's
    ``{path}`` spans several, so its slashes are encoded to find ``/gateway/{upstream}/{path}``."""
    call = GATEWAY_CALL.match(path)
    return call[1] + quote(call[2], safe="") if call else path


def assert_response_matches_spec(openapi: OpenAPI, response: Any) -> None:
    """openapi-core: the operation exists and status, headers and body are as documented."""
    origin = response.request  # its body was consumed by the app: only the route is needed here
    request = MockRequest(origin.host_url, origin.method, path_as_documented(origin.path),
                          content_type=origin.content_type or "")
    openapi.validate_response(request, WerkzeugOpenAPIResponse(response))
    assert len(response.headers.getlist("X-Request-Id")) == 1


def names(table: list[tuple]) -> list[str]:
    return [row[0] for row in table]


@pytest.mark.parametrize(("scenario", "status", "send"), SUCCESSES, ids=names(SUCCESSES))
def test_successful_responses_match_the_spec(openapi, world, monkeypatch, scenario, status, send):
    response = send(world, monkeypatch)
    assert response.status_code == status, response.data
    assert_response_matches_spec(openapi, response)


@pytest.mark.parametrize(("scenario", "status", "error", "send"), ERRORS, ids=names(ERRORS))
def test_error_responses_match_the_spec(openapi, world, monkeypatch, scenario, status, error, send):
    response = send(world, monkeypatch)
    assert (response.status_code, response.get_json()["error"]) == (status, error), response.data
    assert_response_matches_spec(openapi, response)


VALID_REQUESTS: list[tuple[str, str, Callable[[World], dict[str, Any]]]] = [
    ("client_credentials", "/token",
     lambda w: {"data": {"grant_type": "client_credentials", "scope": "read", "audience": [API],
                         "resource": [API + "/a", API + "/b"]}, "headers": w.svc.basic}),
    ("client_secret_post", "/token",
     lambda w: {"data": {"grant_type": "client_credentials", "client_id": "poster",
                         "client_secret": w.poster.secret}}),
    ("private_key_jwt", "/token",
     lambda w: {"data": {"grant_type": "client_credentials", **w.assertion()}}),
    ("token exchange", "/token",
     lambda w: {"data": {"grant_type": EXCHANGE, "subject_token": w.token(),
                         "subject_token_type": ACCESS_TOKEN_TYPE, "actor_token": w.token(w.actor),
                         "actor_token_type": JWT_TOKEN_TYPE, "requested_token_type": JWT_TOKEN_TYPE,
                         "scope": "read", "audience": [API, OTHER_API]}, "headers": w.svc.basic}),
    ("introspection", "/introspect",
     lambda w: {"data": {"token": w.token(), "token_type_hint": "access_token"}, "headers": w.rs.basic}),
    ("revocation", "/revoke", lambda w: {"data": {"token": w.token()}, "headers": w.svc.basic}),
]


@pytest.mark.parametrize(("scenario", "path", "build"), VALID_REQUESTS, ids=names(VALID_REQUESTS))
def test_requests_that_succeed_are_valid_requests_in_the_spec(openapi, world, scenario, path, build):
    """The request schemas accept what the provider accepts (and the answer is a 200)."""
    kwargs = build(world)
    request = EnvironBuilder(path=path, method="POST", base_url="http://localhost", **kwargs).get_request()
    result = openapi.unmarshal_request(WerkzeugOpenAPIRequest(request))
    assert not result.errors, result.errors
    if "audience" in kwargs["data"]:
        assert result.body["audience"] == kwargs["data"]["audience"]
    response = world.http.post(path, **kwargs)
    assert response.status_code == 200, response.data
    assert_response_matches_spec(openapi, response)


INVALID_REQUESTS: list[tuple[str, str, int, Callable[[World], dict[str, Any]]]] = [
    ("missing grant_type", "/token", 400,
     lambda w: {"data": {"scope": "read"}, "headers": w.svc.basic}),
    ("an unsupported grant_type", "/token", 400,
     lambda w: {"data": {"grant_type": "password"}, "headers": w.svc.basic}),
    ("exchange without subject_token_type", "/token", 400,
     lambda w: {"data": {"grant_type": EXCHANGE, "subject_token": w.token()}, "headers": w.svc.basic}),
    ("exchange with an unsupported subject_token_type", "/token", 400,
     lambda w: {"data": {"grant_type": EXCHANGE, "subject_token": w.token(),
                         "subject_token_type": "urn:example:saml"}, "headers": w.svc.basic}),
    ("actor_token without actor_token_type", "/token", 400,
     lambda w: {"data": {"grant_type": EXCHANGE, "subject_token": w.token(),
                         "subject_token_type": ACCESS_TOKEN_TYPE, "actor_token": w.token(w.actor)},
                "headers": w.svc.basic}),
    ("a malformed scope", "/token", 400,
     lambda w: {"data": {"grant_type": "client_credentials", "scope": "read  write"},
                "headers": w.svc.basic}),
    ("33 audiences", "/token", 400,
     lambda w: {"data": {"grant_type": "client_credentials", "audience": [API] * 33},
                "headers": w.svc.basic}),
    ("client_secret without client_id", "/token", 401,
     lambda w: {"data": {"grant_type": "client_credentials", "client_secret": w.poster.secret}}),
    ("client_assertion_type without client_assertion", "/token", 401,
     lambda w: {"data": {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE}}),
    ("too long a client_assertion", "/token", 401,
     lambda w: {"data": {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                         "client_assertion": "a" * 8193}}),
    ("introspection without token", "/introspect", 400,
     lambda w: {"data": {"token_type_hint": "access_token"}, "headers": w.rs.basic}),
]


@pytest.mark.parametrize(("scenario", "path", "status", "build"), INVALID_REQUESTS,
                         ids=names(INVALID_REQUESTS))
def test_requests_the_provider_refuses_are_invalid_in_the_spec(openapi, world, scenario, path, status,
                                                                build):
    kwargs = build(world)
    request = EnvironBuilder(path=path, method="POST", base_url="http://localhost", **kwargs).get_request()
    assert openapi.unmarshal_request(WerkzeugOpenAPIRequest(request)).errors
    response = world.http.post(path, **kwargs)
    assert response.status_code == status, response.data
    assert_response_matches_spec(openapi, response)


WRONG_METHODS = [("GET", "/token"), ("PUT", "/introspect"), ("DELETE", "/revoke"),
                 ("POST", "/healthz"), ("POST", "/.well-known/jwks.json"),
                 ("PATCH", "/.well-known/oauth-authorization-server"), ("POST", "/openapi.yaml"),
                 ("POST", "/connections/x"), ("PUT", "/connect/drive"),
                 ("POST", "/connect/drive/callback"), ("POST", "/metrics")]


@pytest.mark.parametrize(("method", "path"), WRONG_METHODS)
def test_a_wrong_method_gets_the_documented_405(client, document, method, path):
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Request-Id"]
    schema = "/components/responses/MethodNotAllowed/content/application~1json/schema"
    component_validator(document, schema).validate(response.get_json())


def test_an_unknown_path_gets_the_documented_404(client, document):
    response = client.get("/no-such-route")
    assert response.status_code == 404
    schema = "/components/responses/NotFound/content/application~1json/schema"
    component_validator(document, schema).validate(response.get_json())


# ---- schemathesis: generated requests --------------------------------------------------------

OPERATIONS = [("POST", "/token"), ("POST", "/introspect"), ("POST", "/revoke"),
              ("GET", "/.well-known/jwks.json"), ("GET", "/.well-known/oauth-authorization-server"),
              ("GET", "/healthz"), ("GET", "/openapi.yaml"), ("GET", "/metrics")]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
GENERATED = [(method, path, mode) for method, path in OPERATIONS
             for mode in ("positive", "negative") if method == "POST" or mode == "positive"]


def fuzzing_document(document: dict[str, Any], upstreams: tuple[str, ...] = ()) -> dict[str, Any]:
    """The document as schemathesis gets it (a copy it may annotate). With ``upstreams``, upstream
    names and redirect URIs are drawn from a few known ones (a declared upstream, an unknown one;
    the registered redirect URI, another), so that generated requests get past those checks."""
    fuzzed = copy.deepcopy(document)
    if upstreams:
        schemas = fuzzed["components"]["schemas"]
        schemas["UpstreamName"] = {"enum": list(upstreams)}
        schemas["ConnectRequest"]["properties"]["redirect_uri"] = {
            "enum": [REDIRECT, "https://other.example/callback"]}
    return fuzzed


CLIENT_AUTH_PARAMETERS = ("client_id", "client_secret", "client_assertion", "client_assertion_type")
TOKEN_PARAMETERS = ("token", "subject_token", "actor_token")


@pytest.mark.parametrize(("method", "path", "mode"), GENERATED)
def test_generated_requests_get_documented_answers(app, oauth, document, method, path, mode):
    """No 5xx, and every answer documented: status, content type, headers and body.

    Each generated request is sent with HTTP Basic credentials of a registered client (body
    credentials removed, so that authentication succeeds and the request reaches the grant,
    introspection or revocation), with a wrong secret, or as generated (body credentials, if
    any). Token parameters are sometimes replaced by a real token of that client, so that
    successful exchanges and active introspections are generated too.
    """
    caller = oauth.register("fuzzer", audiences=[API, OTHER_API], introspect=True)
    run_generated(app, fuzzing_document(document), method, path, mode, caller,
                  lambda: oauth.access_token(caller))


def run_generated(app: Any, fuzzed: dict[str, Any], method: str, path: str, mode: str,
                  caller: Registered, real_token: Callable[[], str], max_examples: int = 40) -> None:
    """Generated requests to one operation, each sent with the caller's HTTP Basic credentials
    (body credentials removed), with a wrong secret, or as generated; token parameters are
    sometimes replaced by a real token of the caller."""
    schema = schemathesis.openapi.from_dict(fuzzed)
    schema.app = app
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy, auth=st.sampled_from(["basic", "wrong secret", "as generated"]),
           real_tokens=st.booleans())
    def generated(case: schemathesis.Case, auth: str, real_tokens: bool) -> None:
        headers = None
        if auth != "as generated" and isinstance(case.body, dict):
            for name in CLIENT_AUTH_PARAMETERS:
                case.body.pop(name, None)
        if auth == "basic":
            headers = caller.basic
        elif auth == "wrong secret":
            headers = Registered(caller.client_id, "wrong").basic
        if real_tokens and isinstance(case.body, dict):
            for name in TOKEN_PARAMETERS:
                if isinstance(case.body.get(name), str):
                    case.body[name] = real_token()
        response = case.call(headers=headers)
        case.validate_response(response, checks=CHECKS)

    generated()


# ---- regressions this comparison once found ---------------------------------------------


@pytest.mark.parametrize("authorization", ["Basic \xe9", "Basic Zm9v\xe9"])
def test_a_non_ascii_basic_header_is_invalid_client(openapi, client, authorization):
    response = client.post("/token", data={"grant_type": "client_credentials"},
                           headers={"Authorization": authorization})
    assert response.status_code == 401
    assert_response_matches_spec(openapi, response)


@pytest.mark.parametrize("body", [
    {"grant_type": "\u00e9"},
    {"grant_type": 'a"b'},
    [("grant_type", "client_credentials"), ('x"\u00e9', "1"), ('x"\u00e9', "2")],
], ids=["non-ascii grant_type", "quote in grant_type", "repeated odd parameter name"])
def test_error_descriptions_stay_within_the_rfc_6749_character_set(openapi, world, body):
    response = world.post("/token", world.svc, body)
    assert response.status_code == 400
    assert_response_matches_spec(openapi, response)


@pytest.mark.parametrize(("method", "path", "allowed"), [("GET", "/token", {"POST"}),
                                                         ("POST", "/healthz", {"GET", "HEAD"})])
def test_a_405_names_the_allowed_methods(client, method, path, allowed):
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert allowed <= {m.strip() for m in response.headers.get("Allow", "").split(",")}


def test_a_body_over_max_request_bytes_is_413_whatever_its_content_type(world):
    response = world.http.post("/token", data="x" * 70_000, content_type="application/json",
                               headers=world.svc.basic)
    assert response.status_code == 413


# ---- vault, connect flow, refresh and authorization code grants, gateway --------------------

REDIRECT = "https://app.example/callback"
GATEWAY_RESOURCE = "http://localhost/gateway/drive"
ROUTES = [
    {"method": "GET", "path": "/files/{id}", "scope": "files:read"},
    {"method": "HEAD", "path": "/files/{id}", "scope": "files:read"},
    {"method": "PUT", "path": "/files/{id}", "scope": "files:write"},
    {"method": "POST", "path": "/echo", "scope": "files:write"},
    # The fake upstream answers OPTIONS with 405: an upstream error status, passed through.
    {"method": "OPTIONS", "path": "/files/{id}", "scope": "files:read"},
]


NO_CLIENT = Registered("", None)  # a request without client authentication


def upstream_settings(upstream: FakeUpstream) -> dict[str, Any]:
    return {
        "upstreams": {"drive": {
            "base_url": upstream.base_url, "authorize_url": upstream.authorize_url,
            "token_url": upstream.token_url, "client_id": upstream.client_id,
            "client_secret": upstream.client_secret, "scopes": ["files.read"], "routes": ROUTES}},
        "gateway": {"read_timeout": 1},  # so that the 504 row waits one second, not thirty
    }


def local(url: str) -> str:
    """The path and query of one of the provider's own URLs, for the test client."""
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def query_of(response: Any) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["Location"]).query).items()}


class Linked(World):
    """:class:`World` plus a fake upstream, clients of the vault and of the connect flow, and the
    steps of the flows, each returning the provider's response so that any step can be a row."""

    def __init__(self, oauth: OAuth, upstream: FakeUpstream):
        super().__init__(oauth)
        self.upstream = upstream
        self.verifier = pkce()[0]  # of the last connect flow started
        self.app = oauth.register("app", ("authorization_code", "refresh_token", EXCHANGE),
                                  "files:read files:write", redirect_uris=[REDIRECT],
                                  connections=True)
        self.vault_post = oauth.register("vault-post", ("client_credentials",), "files:read",
                                         auth_method="client_secret_post", connections=True)
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.vault_jwt = oauth.register("vault-jwt", ("client_credentials",), "files:read",
                                        auth_method="private_key_jwt", connections=True,
                                        jwks={"keys": [{**public, "kid": "k1", "alg": "ES256"}]})

    # The vault ---------------------------------------------------------------------------

    def deposit(self, client: Registered | None = None, subject: str = "bob", **fields: Any):
        upstream_tokens = self.upstream.issue_tokens()
        body = {"subject": subject, "upstream": "drive",
                "access_token": upstream_tokens["access_token"],
                "refresh_token": upstream_tokens["refresh_token"], "expires_in": 3600, **fields}
        body = {k: v for k, v in body.items() if v is not None}
        headers = {} if client is NO_CLIENT else (client or self.app).basic
        return self.http.post("/connections", json=body, headers=headers)

    def deposited(self, **fields: Any) -> dict[str, Any]:
        response = self.deposit(**fields)
        assert response.status_code == 201, response.data
        return response.get_json()

    def connection(self, path: str = "", method: str = "GET", client: Registered | None = None):
        connection_id = path or self.deposited()["connection_id"]
        return self.http.open(f"/connections/{connection_id}", method=method,
                              headers=(client or self.app).basic)

    # The connect flow --------------------------------------------------------------------

    def start(self, client: Registered | None = None, upstream: str = "drive", **fields: Any):
        self.verifier, challenge = pkce()
        form = {"subject": "alice", "redirect_uri": REDIRECT, "state": "client-state",
                "code_challenge": challenge, "code_challenge_method": "S256",
                "scope": "files:read files:write", **fields}
        return self.post(f"/connect/{upstream}", client or self.app,
                         {k: v for k, v in form.items() if v is not None})

    def open(self, **fields: Any):
        started = self.start(**fields)
        assert started.status_code == 201, started.data
        return self.http.get(local(started.get_json()["authorization_url"]))

    def upstream_callback(self) -> str:
        """The browser at the upstream: where the upstream sends it back (the callback URL)."""
        to_upstream = self.open()
        assert to_upstream.status_code == 303, to_upstream.data

        class Stop(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        try:
            urllib.request.build_opener(Stop).open(to_upstream.headers["Location"], timeout=10)
        except urllib.error.HTTPError as redirect:
            return local(redirect.headers["Location"])
        raise AssertionError("the upstream did not redirect")

    def callback(self):
        return self.http.get(self.upstream_callback())

    def code(self) -> str:
        back = self.callback()
        assert back.status_code == 303, back.data
        return query_of(back)["code"]

    def redeem(self, code: str | None = None, **fields: Any):
        form = {"grant_type": "authorization_code", "code": code or self.code(),
                "redirect_uri": REDIRECT, "code_verifier": self.verifier, **fields}
        return self.post("/token", self.app, {k: v for k, v in form.items() if v is not None})

    def connected(self) -> dict[str, Any]:
        response = self.redeem()
        assert response.status_code == 200, response.data
        return response.get_json()

    def replayed_code(self):
        code = self.code()
        assert self.redeem(code).status_code == 200
        return self.redeem(code)

    def refresh(self, refresh_token: str | None = None, **fields: Any):
        form = {"grant_type": "refresh_token",
                "refresh_token": refresh_token or self.deposited()["refresh_token"], **fields}
        return self.post("/token", self.app, form)

    def reused_refresh_token(self):
        refresh_token = self.deposited()["refresh_token"]
        assert self.refresh(refresh_token).status_code == 200
        return self.refresh(refresh_token)

    # The gateway -------------------------------------------------------------------------

    def call(self, token: str | None = None, path: str = "/files/abc", method: str = "GET",
             scheme: str = "Bearer", **kwargs: Any):
        headers = dict(kwargs.pop("headers", {}))
        if token is None:
            token = self.deposited()["access_token"]
        if token:
            headers["Authorization"] = f"{scheme} {token}"
        return self.http.open(f"/gateway/drive{path}", method=method, headers=headers, **kwargs)

    def narrowed(self, **params: Any) -> str:
        return self.oauth.exchanged(self.app, self.deposited()["access_token"], **params)

    def upstream_down(self):
        token = self.deposited()["access_token"]
        self.upstream.stop()
        return self.call(token)

    def upstream_slow(self):
        token = self.deposited()["access_token"]
        self.upstream.api_delay = 3  # over gateway.read_timeout (1 s here)
        return self.call(token)

    def expired_upstream_token(self):
        token = self.deposited()["access_token"]
        for upstream_token in self.upstream.valid_access_tokens():
            self.upstream.expire(upstream_token)
        return self.call(token)

    # DPoP (RFC 9449) ----------------------------------------------------------------------

    def proof(self, url: str = "http://localhost/token", method: str = "POST",
              token: str | None = None) -> str:
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        claims = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return jwt.encode(claims, self.key, algorithm="ES256",
                          headers={"typ": "dpop+jwt", "jwk": public})

    def bound_refresh(self):
        """A refresh with a proof: a DPoP-bound token for the gateway."""
        return self.post("/token", self.app, {"grant_type": "refresh_token",
                                              "refresh_token": self.deposited()["refresh_token"]},
                         headers={"DPoP": self.proof()})

    def bound_call(self, proof: Callable[[str], str] | None = None):
        token = self.bound_refresh().get_json()["access_token"]
        url = GATEWAY_RESOURCE + "/files/abc"
        made = proof(token) if proof else self.proof(url, "GET", token)
        return self.call(token, scheme="DPoP", headers={"DPoP": made})


@pytest.fixture
def linked(oauth: OAuth, upstream: FakeUpstream) -> Linked:
    return Linked(oauth, upstream)


Flow = Callable[[Linked, pytest.MonkeyPatch], Any]

LINKED_SUCCESSES: list[tuple[str, int, Flow]] = [
    # vault
    ("deposit with client_secret_basic", 201, lambda w, m: w.deposit()),
    ("deposit with client_secret_post members, scope and allowed_ips", 201,
     lambda w, m: w.http.post("/connections", json={
         "subject": "bob", "upstream": "drive", "access_token": "up-at", "scope": "files:read",
         "allowed_ips": ["10.0.0.0/8", "::1/128"], "client_id": "vault-post",
         "client_secret": w.vault_post.secret})),
    ("deposit with private_key_jwt members", 201,
     lambda w, m: w.http.post("/connections", json={
         "subject": "bob", "upstream": "drive", "access_token": "up-at",
         **w.assertion(client_id="vault-jwt")})),
    ("a connection's metadata", 200, lambda w, m: w.connection()),
    ("deleting a connection", 204, lambda w, m: w.connection(method="DELETE")),
    # connect flow
    ("starting the connect flow", 201, lambda w, m: w.start(state=None, scope=None)),
    ("the browser opening the authorization url", 303, lambda w, m: w.open()),
    ("the callback with a code", 303, lambda w, m: w.callback()),
    ("the callback when consent is refused", 303,
     lambda w, m: (setattr(w.upstream, "deny_consent", True), w.callback())[1]),
    ("the callback when the upstream token endpoint fails", 303,
     lambda w, m: (setattr(w.upstream, "token_endpoint_fails", True), w.callback())[1]),
    # grants
    ("authorization_code grant", 200, lambda w, m: w.redeem()),
    ("refresh_token grant narrowing the scope", 200, lambda w, m: w.refresh(scope="files:read")),
    ("refresh_token grant with a DPoP proof", 200, lambda w, m: w.bound_refresh()),
    ("client_credentials with a DPoP proof", 200,
     lambda w, m: w.post("/token", w.svc, {"grant_type": "client_credentials"},
                         headers={"DPoP": w.proof()})),
    ("exchange of a refresh token", 200,
     lambda w, m: w.oauth.exchange(w.app, w.deposited()["refresh_token"],
                                   subject_token_type=REFRESH_TOKEN_TYPE, scope="files:read")),
    ("introspection of a refresh token", 200,
     lambda w, m: w.post("/introspect", w.rs, {"token": w.deposited()["refresh_token"]})),
    ("revocation of a refresh token", 200,
     lambda w, m: w.oauth.revoke(w.app, w.deposited()["refresh_token"])),
    # gateway: the upstream's answers, passed through
    ("gateway GET with a token narrowed to the file", 200,
     lambda w, m: w.call(w.narrowed(scope="files:read", resource=GATEWAY_RESOURCE + "/files/abc"))),
    ("gateway POST with a body", 200,
     lambda w, m: w.call(path="/echo", method="POST", data=b"hello", content_type="text/plain")),
    ("gateway HEAD", 200, lambda w, m: w.call(method="HEAD")),
    ("gateway answer with an upstream error status", 405, lambda w, m: w.call(method="OPTIONS")),
    ("gateway refreshing an expired upstream token", 200, lambda w, m: w.expired_upstream_token()),
    ("gateway with a DPoP-bound token and proof", 200, lambda w, m: w.bound_call()),
]


def with_limits_down(world: Any, monkeypatch: pytest.MonkeyPatch, method: str) -> Any:
    """``method`` on a deposited connection once the rate limits' store answers with a
    connection error (Redis gone)."""
    connection_id = world.deposited()["connection_id"]

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionRefusedError("simulated outage")

    for name in ("test", "hit"):
        monkeypatch.setattr(world.oauth.provider.limiter.strategy, name, refused)
    return world.connection(connection_id, method=method)


LINKED_ERRORS: list[tuple[str, int, str, Flow]] = [
    # POST /connections
    ("deposit of a form body", 400, "invalid_request",
     lambda w, m: w.post("/connections", w.app, {"subject": "bob"})),
    ("deposit with an unknown member", 400, "invalid_request",
     lambda w, m: w.deposit(refresh_tokn="typo")),
    ("deposit with a client credential that is not a string", 400, "invalid_request",
     lambda w, m: w.http.post("/connections", json={"subject": "bob", "upstream": "drive",
                                                    "access_token": "x", "client_id": 1,
                                                    "client_secret": "s"})),
    ("deposit with allowed_ips that are not CIDR ranges", 400, "invalid_request",
     lambda w, m: w.deposit(allowed_ips=["nowhere"])),
    ("deposit with a scope no route uses", 400, "invalid_scope",
     lambda w, m: w.deposit(scope="files:read admin")),
    ("deposit without client authentication", 401, "invalid_client",
     lambda w, m: w.deposit(client=NO_CLIENT)),
    ("deposit with a wrong client_secret member", 401, "invalid_client",
     lambda w, m: w.http.post("/connections", json={"subject": "bob", "upstream": "drive",
                                                    "access_token": "x", "client_id": "vault-post",
                                                    "client_secret": "wrong"})),
    ("deposit by a client without --connections", 403, "unauthorized_client",
     lambda w, m: w.deposit(client=w.svc)),
    ("deposit for an unknown upstream", 404, "not_found",
     lambda w, m: w.deposit(upstream="nope")),
    ("deposit body too large", 413, "invalid_request",
     lambda w, m: w.deposit(access_token="x" * 70_000)),
    ("deposit after too many failed client authentications", 429, "temporarily_unavailable",
     lambda w, m: [w.deposit(client=Registered("app", "wrong")) for _ in range(11)][-1]),
    ("deposit when sealing fails", 500, "server_error",
     lambda w, m: (w.fail_with(m, w.oauth.provider.vault, "seal"), w.deposit())[1]),
    ("deposit with private_key_jwt while the replay cache is down", 503, "temporarily_unavailable",
     lambda w, m: (w.fail_with(m, w.oauth.provider.storage, "claim_once"),
                   w.http.post("/connections", json={"subject": "bob", "upstream": "drive",
                                                     "access_token": "x",
                                                     **w.assertion(client_id="vault-jwt")}))[1]),
    # GET and DELETE /connections/{connection_id}
    ("a connection without client authentication", 401, "invalid_client",
     lambda w, m: w.connection(client=Registered("app", "wrong"))),
    ("a connection, asked by a client without --connections", 403, "unauthorized_client",
     lambda w, m: w.connection(client=w.svc)),
    ("another client's connection", 404, "not_found",
     lambda w, m: w.connection(w.http.post("/connections", json={
         "subject": "bob", "upstream": "drive", "access_token": "x", "client_id": "vault-post",
         "client_secret": w.vault_post.secret}).get_json()["connection_id"])),
    ("deleting an unknown connection", 404, "not_found",
     lambda w, m: w.connection("unknown", method="DELETE")),
    ("a connection while the rate-limit store is down", 503, "temporarily_unavailable",
     lambda w, m: with_limits_down(w, m, "GET")),
    ("deleting a connection while the rate-limit store is down", 503, "temporarily_unavailable",
     lambda w, m: with_limits_down(w, m, "DELETE")),
    # POST /connect/{upstream}
    ("connect with an unregistered redirect_uri", 400, "invalid_request",
     lambda w, m: w.start(redirect_uri="https://evil.example/callback")),
    ("connect with code_challenge_method plain", 400, "invalid_request",
     lambda w, m: w.start(code_challenge_method="plain")),
    ("connect by a client without the authorization_code grant", 400, "unauthorized_client",
     lambda w, m: w.start(client=w.svc)),
    ("connect with a scope no route uses", 400, "invalid_scope",
     lambda w, m: w.start(scope="admin")),
    ("connect without client authentication", 401, "invalid_client",
     lambda w, m: w.start(client=Registered("app", "wrong"))),
    ("connect to an unknown upstream", 404, "not_found", lambda w, m: w.start(upstream="nope")),
    ("connect with a body too large", 413, "invalid_request",
     lambda w, m: w.post("/connect/drive", w.app, TOO_LARGE, content_type=FORM)),
    # GET /connect/{upstream} and the callback
    ("opening without request_uri", 400, "invalid_request", lambda w, m: w.http.get("/connect/drive")),
    ("opening an authorization url twice", 400, "invalid_request",
     lambda w, m: (lambda url: [w.http.get(url) for _ in range(2)][1])(
         local(w.start().get_json()["authorization_url"]))),
    ("opening for an unknown upstream", 404, "not_found",
     lambda w, m: w.http.get("/connect/nope?request_uri=urn:ietf:params:oauth:request_uri:x")),
    ("a callback used twice", 400, "invalid_request",
     lambda w, m: (lambda url: [w.http.get(url) for _ in range(2)][1])(w.upstream_callback())),
    ("a callback for an unknown upstream", 404, "not_found",
     lambda w, m: w.http.get("/connect/nope/callback?state=s&code=c")),
    # POST /token, authorization_code and refresh_token
    ("a replayed authorization code", 400, "invalid_grant", lambda w, m: w.replayed_code()),
    ("an authorization code with a wrong code_verifier", 400, "invalid_grant",
     lambda w, m: w.redeem(code_verifier=pkce()[0])),
    ("an authorization code without code_verifier", 400, "invalid_request",
     lambda w, m: w.redeem(code="c", code_verifier=None)),
    ("an unknown refresh token", 400, "invalid_grant", lambda w, m: w.refresh("unknown")),
    ("a reused refresh token", 400, "invalid_grant", lambda w, m: w.reused_refresh_token()),
    ("a refresh widening the scope", 400, "invalid_scope",
     lambda w, m: w.refresh(w.deposited(scope="files:read")["refresh_token"],
                            scope="files:read files:write")),
    ("a refresh by a client without the refresh_token grant", 400, "unauthorized_client",
     lambda w, m: w.post("/token", w.svc, {"grant_type": "refresh_token", "refresh_token": "r"})),
    ("a token request with an invalid DPoP proof", 400, "invalid_dpop_proof",
     lambda w, m: w.post("/token", w.svc, {"grant_type": "client_credentials"},
                         headers={"DPoP": "not-a-proof"})),
    # the gateway's own refusals
    ("gateway without a token", 401, "invalid_request", lambda w, m: w.call("")),
    ("gateway with an invalid token", 401, "invalid_token", lambda w, m: w.call("not-a-token")),
    ("gateway with the token in the query", 401, "invalid_token",
     lambda w, m: w.http.get("/gateway/drive/files/abc?access_token=" + w.deposited()["access_token"])),
    ("gateway with a token for another audience", 401, "invalid_token",
     lambda w, m: w.call(w.token())),
    ("gateway with a token of a deleted connection", 401, "invalid_token",
     lambda w, m: (lambda body: (w.connection(body["connection_id"], method="DELETE"),
                                 w.call(body["access_token"]))[1])(w.deposited())),
    ("gateway with a DPoP-bound token as Bearer", 401, "invalid_token",
     lambda w, m: w.call(w.bound_refresh().get_json()["access_token"])),
    ("gateway with a DPoP proof without ath", 401, "invalid_dpop_proof",
     lambda w, m: w.bound_call(lambda token: w.proof(GATEWAY_RESOURCE + "/files/abc", "GET"))),
    ("gateway beyond the token's scope", 403, "insufficient_scope",
     lambda w, m: w.call(w.narrowed(scope="files:read"), method="PUT", data=b"x")),
    ("gateway outside the token's resource", 403, "insufficient_scope",
     lambda w, m: w.call(w.narrowed(resource=GATEWAY_RESOURCE + "/files/abc"), "/files/other")),
    ("gateway from outside the connection's allowed_ips", 403, "access_denied",
     lambda w, m: w.call(w.deposited(allowed_ips=["10.0.0.0/8"])["access_token"])),
    ("gateway to an unknown upstream", 404, "not_found",
     lambda w, m: w.http.get("/gateway/nope/files/abc", headers={"Authorization": "Bearer x"})),
    ("gateway to an undeclared route", 404, "not_found", lambda w, m: w.call(path="/admin")),
    ("gateway with an encoded slash", 404, "not_found", lambda w, m: w.call(path="/files/a%2Fb")),
    ("gateway to the upstream root", 404, "not_found", lambda w, m: w.call(path="")),
    ("gateway TRACE", 404, "not_found", lambda w, m: w.call(method="TRACE")),
    ("gateway with a body too large", 413, "invalid_request",
     lambda w, m: w.call(path="/echo", method="POST", data=b"x" * (10 * 1024 * 1024 + 1))),
    ("gateway failing unexpectedly", 500, "server_error",
     lambda w, m: (w.fail_with(m, w.oauth.provider.gateway, "credential"), w.call())[1]),
    ("gateway with the upstream down", 502, "bad_gateway", lambda w, m: w.upstream_down()),
    ("gateway with a credential the upstream refuses", 502, "bad_gateway",
     lambda w, m: w.call(w.http.post("/connections", json={
         "subject": "bob", "upstream": "drive", "access_token": "revoked-upstream-token"},
         headers=w.app.basic).get_json()["access_token"])),
    ("gateway with the upstream too slow", 504, "gateway_timeout", lambda w, m: w.upstream_slow()),
]


BASIC = Registered("app", "secret").basic
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"  # RFC 7636 Appendix B
LINKED_REQUESTS: list[tuple[str, bool, str, str, dict[str, Any]]] = [
    # (scenario, valid, method, path, EnvironBuilder arguments)
    ("a deposit with HTTP Basic", True, "POST", "/connections",
     {"json": {"subject": "bob", "upstream": "drive", "access_token": "a", "refresh_token": "r",
               "expires_in": 3600, "scope": "files:read", "allowed_ips": ["10.0.0.0/8"]},
      "headers": BASIC}),
    ("a deposit with client_secret_post members", True, "POST", "/connections",
     {"json": {"subject": "bob", "upstream": "drive", "access_token": "a", "client_id": "app",
               "client_secret": "secret"}}),
    ("a deposit with an unknown member", False, "POST", "/connections",
     {"json": {"subject": "bob", "upstream": "drive", "access_token": "a", "refresh_tokn": "r"},
      "headers": BASIC}),
    ("a deposit with expires_in true", False, "POST", "/connections",
     {"json": {"subject": "bob", "upstream": "drive", "access_token": "a", "expires_in": True},
      "headers": BASIC}),
    ("a deposit with a subject with a space", False, "POST", "/connections",
     {"json": {"subject": "b b", "upstream": "drive", "access_token": "a"}, "headers": BASIC}),
    ("a deposit as a form", False, "POST", "/connections",
     {"data": {"subject": "bob", "upstream": "drive", "access_token": "a"}, "headers": BASIC}),
    ("starting the connect flow", True, "POST", "/connect/drive",
     {"data": {"subject": "alice", "redirect_uri": REDIRECT, "state": "s", "scope": "files:read",
               "code_challenge": CHALLENGE, "code_challenge_method": "S256"}, "headers": BASIC}),
    ("starting the connect flow with method plain", False, "POST", "/connect/drive",
     {"data": {"subject": "alice", "redirect_uri": REDIRECT, "code_challenge": CHALLENGE,
               "code_challenge_method": "plain"}, "headers": BASIC}),
    ("starting the connect flow with a short code_challenge", False, "POST", "/connect/drive",
     {"data": {"subject": "alice", "redirect_uri": REDIRECT, "code_challenge": "short",
               "code_challenge_method": "S256"}, "headers": BASIC}),
    ("opening the authorization url", True, "GET", "/connect/drive",
     {"query_string": {"request_uri": "urn:ietf:params:oauth:request_uri:abc_-1"}}),
    ("the upstream's callback", True, "GET", "/connect/drive/callback",
     {"query_string": {"state": "s", "code": "c", "iss": "https://upstream.example"}}),
    ("a callback without state", False, "GET", "/connect/drive/callback",
     {"query_string": {"code": "c"}}),
    ("a refresh_token grant", True, "POST", "/token",
     {"data": {"grant_type": "refresh_token", "refresh_token": "r", "scope": "files:read"},
      "headers": BASIC}),
    ("a refresh_token grant without refresh_token", False, "POST", "/token",
     {"data": {"grant_type": "refresh_token"}, "headers": BASIC}),
    ("an authorization_code grant", True, "POST", "/token",
     {"data": {"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT,
               "code_verifier": "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"}, "headers": BASIC}),
    ("an authorization_code grant without code_verifier", False, "POST", "/token",
     {"data": {"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT},
      "headers": BASIC}),
    ("a refresh token as an exchange subject", True, "POST", "/token",
     {"data": {"grant_type": EXCHANGE, "subject_token": "r", "subject_token_type": REFRESH_TOKEN_TYPE},
      "headers": BASIC}),
    ("a token request with a DPoP proof", True, "POST", "/token",
     {"data": {"grant_type": "client_credentials"}, "headers": {**BASIC, "DPoP": "a.b.c"}}),
    ("a gateway call on several segments", True, "PUT", "/gateway/drive/files/abc",
     {"data": b"anything", "content_type": "application/octet-stream",
      "headers": {"Authorization": "Bearer a.b.c"}}),
    ("a gateway call to the upstream root", True, "GET", "/gateway/drive",
     {"headers": {"Authorization": "DPoP a.b.c", "DPoP": "a.b.c"}}),
]


class DocumentedPathRequest(WerkzeugOpenAPIRequest):
    """A request whose gateway path spans segments, seen as the document's one ``{path}``."""

    @property
    def path(self) -> str:
        return path_as_documented(super().path)


@pytest.mark.parametrize(("scenario", "valid", "method", "path", "arguments"), LINKED_REQUESTS,
                         ids=names(LINKED_REQUESTS))
def test_new_request_shapes_are_as_the_provider_takes_them(openapi, scenario, valid, method, path,
                                                           arguments):
    """The request schemas accept what the provider accepts and refuse what it refuses (the
    provider's side of each is a row of :class:`TestVaultConnectAndGateway`)."""
    request = EnvironBuilder(path=path, method=method, base_url="http://localhost",
                             **arguments).get_request()
    errors = openapi.unmarshal_request(DocumentedPathRequest(request)).errors
    assert (not errors) == valid, errors


GATEWAY_CHALLENGES = {"invalid_request": 'Bearer realm="token-provider"',  # RFC 6750 §3.1
                      "invalid_token": 'Bearer realm="token-provider", error="invalid_token"'}


class TestVaultConnectAndGateway:
    """Real requests against an upstream declared in the configuration (the fake upstream)."""

    @pytest.fixture
    def settings_overrides(self, request: pytest.FixtureRequest, upstream: FakeUpstream):
        return {**upstream_settings(upstream), **getattr(request, "param", {})}

    @pytest.mark.parametrize(("scenario", "status", "send"), LINKED_SUCCESSES,
                             ids=names(LINKED_SUCCESSES))
    def test_successful_responses_match_the_spec(self, openapi, linked, monkeypatch, scenario,
                                                 status, send):
        response = send(linked, monkeypatch)
        assert response.status_code == status, response.data
        assert_response_matches_spec(openapi, response)

    @pytest.mark.parametrize(("scenario", "status", "error", "send"), LINKED_ERRORS,
                             ids=names(LINKED_ERRORS))
    def test_error_responses_match_the_spec(self, openapi, linked, monkeypatch, scenario, status,
                                            error, send):
        seen = len(linked.upstream.requests)
        response = send(linked, monkeypatch)
        assert (response.status_code, response.get_json()["error"]) == (status, error), response.data
        assert_response_matches_spec(openapi, response)
        if status == 429:
            assert int(response.headers["Retry-After"]) >= 1
        if response.request.path.startswith("/gateway/"):
            if status in (401, 403, 404, 413):
                assert len(linked.upstream.requests) == seen, "a refused call reached the upstream"
            if status == 401 and error in GATEWAY_CHALLENGES:
                assert response.headers["WWW-Authenticate"] == GATEWAY_CHALLENGES[error]

    @pytest.mark.parametrize("settings_overrides", [{"role": "web"}], indirect=True)
    def test_a_web_role_instance_deposits_and_forwards_nothing(self, openapi, linked):
        deposited = linked.deposit()
        assert deposited.status_code == 201, deposited.data
        assert_response_matches_spec(openapi, deposited)
        for method in ("GET", "HEAD"):
            refused = linked.call(deposited.get_json()["access_token"], method=method)
            assert refused.status_code == 503
            assert_response_matches_spec(openapi, refused)
        assert refused.data == b""  # HEAD
        assert linked.upstream.requests == []

    @pytest.mark.parametrize(("scenario", "status", "challenge", "send"), [
        ("no token", 401, GATEWAY_CHALLENGES["invalid_request"], lambda w: w.call("", method="HEAD")),
        ("an invalid token", 401, GATEWAY_CHALLENGES["invalid_token"],
         lambda w: w.call("x", method="HEAD")),
        ("beyond the token's scope", 403, 'Bearer realm="token-provider", error="insufficient_scope",'
         ' scope="files:read"', lambda w: w.call(w.deposited(scope="files:write")["access_token"],
                                                 method="HEAD")),
        ("an undeclared route", 404, None, lambda w: w.call(path="/admin", method="HEAD")),
    ], ids=["no token", "an invalid token", "beyond the token's scope", "an undeclared route"])
    def test_gateway_refusals_of_head_have_no_body(self, openapi, linked, scenario, status,
                                                   challenge, send):
        response = send(linked)
        assert response.status_code == status
        assert response.data == b""
        assert response.headers.get("WWW-Authenticate") == challenge
        assert_response_matches_spec(openapi, response)

    def test_gateway_connect_is_never_forwarded(self, document, linked):
        """CONNECT has no OpenAPI 3.1 operation; the path item says it is answered like TRACE."""
        response = linked.call(method="CONNECT")
        assert response.status_code == 404
        assert response.headers["Cache-Control"] == "no-store"
        schema = "/components/responses/GatewayNotFound/content/application~1json/schema"
        component_validator(document, schema).validate(response.get_json())
        assert linked.upstream.requests == []

    @pytest.mark.parametrize(("method", "path", "mode"), [
        (method, path, mode) for method, path in [("POST", "/connections"), ("POST", "/connect/{upstream}")]
        for mode in ("positive", "negative")])
    def test_generated_requests_get_documented_answers(self, app, linked, document, method, path,
                                                       mode):
        """As for the token endpoints: the caller may deposit and start the connect flow."""
        run_generated(app, fuzzing_document(document, ("drive", "nope")), method, path, mode,
                      linked.app, lambda: linked.deposited()["access_token"])

    def test_generated_browser_and_connection_requests_get_documented_answers(self, app, linked,
                                                                              document):
        fuzzed = fuzzing_document(document, ("drive", "nope"))
        for method, path in [("GET", "/connect/{upstream}"), ("GET", "/connect/{upstream}/callback"),
                             ("GET", "/connections/{connection_id}"),
                             ("DELETE", "/connections/{connection_id}")]:
            run_generated(app, fuzzed, method, path, "positive", linked.app,
                          lambda: linked.deposited()["access_token"], max_examples=15)

    def test_generated_gateway_calls_get_documented_answers(self, app, linked, document):
        """Every method on both gateway paths, with no token, a bogus one (as ``Bearer`` or
        ``DPoP``) or a real one: refusals are the documented ones, and what passes is the
        upstream's answer. No 5xx."""
        schema = schemathesis.openapi.from_dict(fuzzing_document(document, ("drive", "nope")))
        schema.app = app
        real = linked.deposited()["access_token"]
        for path in ("/gateway/{upstream}", "/gateway/{upstream}/{path}"):
            for method in HTTP_METHODS:
                strategy = schema[path][method.upper()].as_strategy(
                    generation_mode=schemathesis.GenerationMode.POSITIVE)

                @settings(max_examples=12, derandomize=True, database=None, deadline=None,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy, auth=st.sampled_from(["none", "Bearer bogus", "DPoP bogus",
                                                            f"Bearer {real}"]))
                def generated(case: schemathesis.Case, auth: str) -> None:
                    case.headers = {k: v for k, v in (case.headers or {}).items()
                                    if k.lower() != "authorization"}
                    if auth != "none":
                        case.headers["Authorization"] = auth
                    response = case.call()
                    case.validate_response(response, checks=CHECKS)

                generated()
