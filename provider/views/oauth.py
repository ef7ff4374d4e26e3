"""The token (RFC 6749 §3.2), introspection (RFC 7662) and revocation (RFC 7009) endpoints."""

from __future__ import annotations

from flask import Blueprint, request

from provider import grants
from provider.dpop import InvalidDPoPProof
from provider.errors import Forbidden
from provider.introspection import introspect
from provider.revocation import revoke_presented_token
from provider.schemas import TokenRequest, load
from provider.views import authenticated_client, counted_client, json_response, provider
from provider.views.forms import read_form

bp = Blueprint("oauth", __name__)
_token_request = TokenRequest()


@bp.post("/token")
def token():
    form = read_form()
    client, admission = counted_client(form, counted_as="token")
    with admission:
        jkt = None
        if "DPoP" in request.headers:
            admission.check()  # before the proof's jti is spent
            jkt = provider().dpop.verify(request.headers.getlist("DPoP"), method="POST",
                                         url=provider().settings.token_endpoint).jkt
        elif client.dpop_required:
            raise InvalidDPoPProof("this client must send a DPoP proof")
        body = grants.issue(provider(), client, form, dpop_jkt=jkt, admission=admission)
    return json_response(body)


@bp.post("/introspect")
def introspection():
    form = read_form()
    client, admission = counted_client(form, counted_as="introspect")
    with admission:  # introspecting has no effect: done while the limiter answers
        if not client.can_introspect:
            raise Forbidden("this client may not introspect tokens")
        params = load(_token_request, form)
        answer = introspect(provider(), params["token"])
    provider().event("introspection", client_id=client.client_id, active=answer["active"],
                     jti=answer.get("jti"), sub=answer.get("sub"))
    return json_response(answer)


@bp.post("/revoke")
def revocation():
    form = read_form()
    client = authenticated_client(form)
    params = load(_token_request, form)
    revoke_presented_token(provider(), client, params["token"])
    return json_response({})
