"""The connect flow's three steps (see :mod:`provider.connect`)."""

from __future__ import annotations

from flask import Blueprint, redirect, request

from provider import connect
from provider.schemas import ConnectRequest, load
from provider.views import authenticated_client, json_response, provider
from provider.views.forms import read_form

bp = Blueprint("connect", __name__)
_start = ConnectRequest()


@bp.post("/connect/<upstream>")
def start(upstream: str):
    form = read_form()
    client = authenticated_client(form)
    return json_response(connect.start(provider(), client, upstream, load(_start, form)), 201)


@bp.get("/connect/<upstream>")
def open_in_browser(upstream: str):
    target = connect.authorization_redirect(provider(), upstream, request.args.get("request_uri"))
    return _redirect(target)


@bp.get("/connect/<upstream>/callback")
def callback(upstream: str):
    return _redirect(connect.callback(provider(), upstream, request.args.to_dict(flat=True)))


def _redirect(location: str):
    response = redirect(location, 303)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
