"""Adapts a Starlette request to authlib's OAuth2Request: the only protocol-facing glue.

The form is read (async) before the protocol core runs (sync), so the adapter holds plain
values. The request's URI is rebuilt on the issuer's base URL: behind a TLS-terminating
proxy the issuer is the https address clients use.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from authlib.oauth2.rfc6749 import OAuth2Payload, OAuth2Request
from starlette.datastructures import FormData, QueryParams
from starlette.requests import Request

Params = dict[str, list[str]]


def params_of(items: QueryParams | FormData) -> Params:
    values: Params = defaultdict(list)
    for key, value in items.multi_items():
        if isinstance(value, str):
            values[key].append(value)
    return dict(values)


class Values:
    """A read-only multi-dict as authlib uses it: get, [], in (each key's first value)."""

    def __init__(self, params: Params) -> None:
        self._params = params

    def get(self, key: str, default: Any = None) -> Any:
        values = self._params.get(key)
        return values[0] if values else default

    def __getitem__(self, key: str) -> str:
        return self._params[key][0]

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def __iter__(self) -> Any:
        return iter(self._params)

    def getlist(self, key: str) -> list[str]:
        return list(self._params.get(key, []))

    def duplicated(self) -> list[str]:
        return sorted(k for k, v in self._params.items() if len(v) > 1)


class Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, params: Params) -> None:
        self._values = Values(params)
        self._datalist = defaultdict(list, {k: list(v) for k, v in params.items()})

    @property
    def data(self) -> Values:
        return self._values

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class StarletteOAuth2Request(OAuth2Request):  # type: ignore[misc]
    """The protocol's view of one request. `payload` is the query (authorization endpoint)
    or the form body (token, revocation and introspection endpoints)."""

    def __init__(
        self, request: Request, base_url: str, args: Params, form: Params, *, from_form: bool
    ) -> None:
        uri = base_url + request.url.path
        if request.url.query:
            uri += "?" + request.url.query
        super().__init__(request.method, uri, headers=request.headers)
        self._args = Values(args)
        self._form = Values(form)
        self.payload = Payload(form if from_form else args)

    @property
    def args(self) -> Values:
        return self._args

    @property
    def form(self) -> Values:
        return self._form


async def adapt(request: Request, base_url: str, *, from_form: bool) -> StarletteOAuth2Request:
    args = params_of(request.query_params)
    form: Params = {}
    if request.method == "POST":
        async with request.form() as data:
            form = params_of(data)
    return StarletteOAuth2Request(request, base_url, args, form, from_form=from_form)
