from tests.conftest import on_every_backend
from tests.support import claims_of


@on_every_backend
def test_client_credentials_then_exchange_then_revoke_cascades(oauth):
    svc = oauth.register("svc", audiences=["https://api.example/v1"])
    root = oauth.access_token(svc)
    child = oauth.exchanged(svc, root, scope="read", resource="https://api.example/v1/files/1")
    assert claims_of(child)["scope"] == "read"
    assert oauth.active(child)
    assert oauth.revoke(svc, root).status_code == 200
    assert not oauth.active(root)
    assert not oauth.active(child)
