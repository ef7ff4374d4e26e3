"""openapi.yaml is the provider's HTTP contract: it must be a valid OpenAPI 3.1 document, be what
``GET /openapi.yaml`` serves, describe exactly the routes the app has, and describe every answer
the app really gives, successes and errors alike.

Three layers: a table of real requests whose responses openapi-core validates against the
document; schemathesis generating requests from the document and checking each answer (no 5xx,
documented status, content type, headers and body); and regression tests for the provider bugs
this comparison exposed.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

from tests.support import ACCESS_TOKEN_TYPE, EXCHANGE, FORM, JWT_TOKEN_TYPE, OAuth, Registered

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
API = "https://api.example/v1"
OTHER_API = "https://other.example/"
TOO_LARGE = "token=" + "x" * 70_000  # over the default tokens.max_request_bytes (65536)
# Flask registers /static/<filename> by itself; there is no static folder, so it only ever 404s.
FRAMEWORK_ROUTES = {"static"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    config = Config(extra_media_type_deserializers={
        "application/jwk-set+json": json.loads,  # RFC 7517 §8.5: JSON
        "application/yaml": yaml.safe_load,
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


def test_the_document_describes_exactly_the_routes_the_app_serves(app, document):
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in FRAMEWORK_ROUTES:
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        served |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(method, path) for path, item in document["paths"].items()
                 for method in item if method in ("get", "post", "put", "patch", "delete")}
    assert described == served


def test_every_operation_has_an_id_a_tag_a_description_and_error_answers(document):
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
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

    def assertion(self, jti: str | None = None) -> dict[str, str]:
        now = int(time.time())
        claims = {"iss": "signer", "sub": "signer", "aud": "http://localhost/token",
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
    ("the openapi document", 200, lambda w, m: w.http.get("/openapi.yaml")),
]

ERRORS: list[tuple[str, int, str, Scenario]] = [
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


def assert_response_matches_spec(openapi: OpenAPI, response: Any) -> None:
    """openapi-core: the operation exists and status, headers and body are as documented."""
    origin = response.request  # its body was consumed by the app: only the route is needed here
    request = MockRequest(origin.host_url, origin.method, origin.path,
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
                 ("PATCH", "/.well-known/oauth-authorization-server"), ("POST", "/openapi.yaml")]


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
              ("GET", "/healthz"), ("GET", "/openapi.yaml")]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
GENERATED = [(method, path, mode) for method, path in OPERATIONS
             for mode in ("positive", "negative") if method == "POST" or mode == "positive"]


def fuzzing_document(document: dict[str, Any]) -> dict[str, Any]:
    """The document as schemathesis gets it (a copy it may annotate)."""
    return copy.deepcopy(document)


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
    schema = schemathesis.openapi.from_dict(fuzzing_document(document))
    schema.app = app
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @settings(max_examples=40, derandomize=True, database=None, deadline=None,
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
                    case.body[name] = oauth.access_token(caller)
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
