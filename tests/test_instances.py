"""Several instances, as separate server processes sharing one database."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from provider import config
from provider.clients import register_client
from provider.service import Provider, initialize
from tests.conftest import on_every_backend
from tests.servers import serving

pytestmark = pytest.mark.server
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def post(url: str, credentials: tuple[str, str], **form: str) -> tuple[int, dict]:
    basic = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                     headers={"Authorization": f"Basic {basic}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def deployment(database_url, tmp_path):
    env = {"PROVIDER_DATABASE_URL": database_url, "PROVIDER_KEYS_DIR": str(tmp_path / "keys"),
           "PROVIDER_ISSUER": "http://provider.test"}
    settings = config.load(environ=env | {"PROVIDER_CONFIG": str(tmp_path / "provider.toml")})
    initialize(settings)
    provider = Provider(settings)
    clients = {}
    for name, options in {"svc": {}, "rs": {"introspect": True}}.items():
        _, secret = register_client(
            provider.storage, provider.hasher, issuer=settings.issuer, max_ttl=3600,
            client_id=name, grant_types=["client_credentials", EXCHANGE], scope="read write",
            **options)
        clients[name] = (name, secret)
    provider.storage.engine.dispose()
    return env | {"PROVIDER_CONFIG": str(tmp_path / "provider.toml")}, clients


@on_every_backend
def test_revocation_on_one_instance_holds_on_another_within_a_second(deployment):
    env, clients = deployment
    with serving(env, workers=2) as first, serving(env, workers=2) as second:
        status, issued = post(f"{first}/token", clients["svc"], grant_type="client_credentials")
        assert status == 200
        root = issued["access_token"]
        _, exchanged = post(f"{second}/token", clients["svc"], grant_type=EXCHANGE,
                            subject_token=root, subject_token_type=ACCESS, scope="read")
        child = exchanged["access_token"]
        # Issued by one instance, introspected by the other.
        assert post(f"{second}/introspect", clients["rs"], token=child)[1]["active"] is True
        assert post(f"{first}/revoke", clients["svc"], token=root)[0] == 200
        # Lazily synced: whatever request comes a second later must see the revocation.
        time.sleep(1.0)
        assert post(f"{second}/introspect", clients["rs"], token=child)[1] == {"active": False}
        status, refused = post(f"{second}/token", clients["svc"], grant_type=EXCHANGE,
                               subject_token=child, subject_token_type=ACCESS)
        assert (status, refused["error"]) == (400, "invalid_request")


def test_revocation_survives_restarting_every_instance(deployment):
    env, clients = deployment
    with serving(env) as url:
        token = post(f"{url}/token", clients["svc"], grant_type="client_credentials")[1]
        post(f"{url}/revoke", clients["svc"], token=token["access_token"])
    with serving(env) as url:
        assert post(f"{url}/introspect", clients["rs"],
                    token=token["access_token"])[1] == {"active": False}
