"""Plain HTTP on the server's port: requests without ``Upgrade: websocket``.

Routes map a path to a handler that returns an :class:`HttpResponse`. Any
path that is not a route answers 404 to plain HTTP and stays upgradable to a
WebSocket (original clients use any path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from picows import WSUpgradeRequest, WSUpgradeResponse

Handler = Callable[[], "HttpResponse"]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One HTTP answer."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    """``obj`` as a JSON answer."""
    return HttpResponse(status, orjson.dumps(obj))


NOT_FOUND = HttpResponse(404, b"not found: dwsps speaks WebSocket here\n", "text/plain")


class HttpRoutes:
    """The plain-HTTP paths a server answers."""

    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: dict[str, Handler] = {}

    def add(self, path: str, handler: Handler) -> None:
        """Answer ``GET path`` with ``handler()``."""
        self._routes[path] = handler

    def get(self, path: str) -> HttpResponse:
        """The answer for ``path`` (404 when it is no route)."""
        handler = self._routes.get(path)
        return NOT_FOUND if handler is None else handler()

    def respond(self, request: WSUpgradeRequest) -> WSUpgradeResponse:
        """The picows response for a plain HTTP request."""
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        answer = self.get(path)
        headers = {"Content-Type": answer.content_type, **answer.headers}
        response: WSUpgradeResponse
        if answer.status == 200:
            response = WSUpgradeResponse.create_ok_response(answer.body, headers)
        else:
            response = WSUpgradeResponse.create_error_response(answer.status, answer.body, headers)
        return response
