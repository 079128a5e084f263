"""Plain HTTP on the server's port: requests without ``Upgrade: websocket``.

Routes map a path (and methods) to a handler that takes an :class:`HttpRequest`
and returns an :class:`HttpResponse`, or an awaitable of one when the answer
must wait (a publish whose history lives in Redis). Any path that is not a
route answers 404 to plain HTTP and stays upgradable to a WebSocket (original
clients use any path). A route may have a *guard* (the API key check): it
answers before the handler and, like 404 and 405, before the body is read, so
a request refused anyway gets that answer and not 413 for a large body.
Parsing and the socket belong to :mod:`dwsps.listener`.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One plain HTTP request, body read in full (bounded by the listener)."""

    method: str
    path: str
    query: str = ""
    headers: CIMultiDictProxy[str] = field(default_factory=lambda: CIMultiDictProxy(CIMultiDict()))
    body: bytes = b""
    remote: str = ""

    def bearer(self) -> str | None:
        """The token of an ``Authorization: Bearer`` header, if any."""
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One HTTP answer."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[HttpRequest], HttpResponse]
Answer = HttpResponse | Awaitable[HttpResponse]
"""What a route answers: a response, or one to wait for."""
Guard = Callable[[HttpRequest], HttpResponse | None]
"""Refuses a request (without its body) with a response, or lets it through with None."""


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    """``obj`` as a JSON answer."""
    return HttpResponse(status, orjson.dumps(obj))


def text_response(status: int, text: str) -> HttpResponse:
    """A one-line plain-text answer (errors at the upgrade, for example)."""
    return HttpResponse(status, text.encode() + b"\n", "text/plain; charset=utf-8")


NOT_FOUND = text_response(404, "not found: dwsps speaks WebSocket here")


def unauthorized(what: str = "a valid key") -> HttpResponse:
    """401 for a request without an accepted ``Authorization: Bearer`` key."""
    return HttpResponse(
        401,
        orjson.dumps({"error": "unauthorized", "detail": f"{what} is required"}),
        headers={"WWW-Authenticate": 'Bearer realm="dwsps"'},
    )


class KeyCheck:
    """Whether a request presents one of some keys as ``Authorization: Bearer`` (the one
    place keys are compared: in constant time)."""

    __slots__ = ("_keys",)

    def __init__(self, *keys: str) -> None:
        self._keys = tuple(key.encode() for key in keys if key)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def allows(self, request: HttpRequest) -> bool:
        """Whether ``request`` carries one of the keys."""
        presented = request.bearer()
        if presented is None:
            return False
        given = presented.encode()
        # Every key is compared, so the time says nothing about which one matched.
        return sum(secrets.compare_digest(given, key) for key in self._keys) > 0


class HttpRoutes:
    """The plain-HTTP paths a server answers."""

    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: dict[
            str, tuple[frozenset[str], Callable[[HttpRequest], Answer], Guard | None]
        ] = {}

    def add(
        self,
        path: str,
        handler: Callable[[HttpRequest], Answer],
        methods: tuple[str, ...] = ("GET",),
        guard: Guard | None = None,
    ) -> None:
        """Answer ``methods`` on ``path`` with ``handler(request)`` (``HEAD`` goes with
        ``GET``), unless ``guard(request)`` refuses it first."""
        allowed = set(methods)
        if "GET" in allowed:
            allowed.add("HEAD")
        self._routes[path] = (frozenset(allowed), handler, guard)

    def get(self, path: str) -> HttpResponse:
        """The answer to ``GET path`` (tests and tools; not for a deferred answer)."""
        answer = self.respond(HttpRequest("GET", path))
        assert isinstance(answer, HttpResponse)
        return answer

    def refusal(self, request: HttpRequest) -> HttpResponse | None:
        """What ``request`` gets whatever its body (404, 405, its guard's refusal), or None."""
        route = self._routes.get(request.path)
        if route is None:
            return NOT_FOUND
        methods, _, guard = route
        if request.method not in methods:
            allow = ", ".join(sorted(methods))
            return HttpResponse(405, b"method not allowed\n", "text/plain", {"Allow": allow})
        return guard(request) if guard is not None else None

    def respond(self, request: HttpRequest) -> Answer:
        """The answer to ``request``: its route's, 404, 405 or its guard's."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        return self._routes[request.path][1](request)
