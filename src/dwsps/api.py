"""The HTTP API: publishing and introspection for backends without a WebSocket.

Off (404) unless an API key is configured; every request must then carry
``Authorization: Bearer <key>`` (401 otherwise). A publish made here goes
through the same path as a WebSocket publish (``Hub.route``: identity, local
delivery, peers and backplane, counters, the ``publish`` event), with the same
topic rules and error codes.

``POST /api/publish``
    ``{"topic": …, "message": …}`` → 200 ``{"deliveries": N}`` (plus ``stream``,
    ``offset``, ``epoch`` when the topic has history); or a JSON array
    of such objects → 200 ``{"published": n, "deliveries": N}``. Every item is
    validated before any is published; a bad one → 400 ``{"error", "detail",
    "index"}``. A body over the frame size limit → 413 (the listener). While
    the server is over its memory budget → 503 ``overloaded``, as a WebSocket
    publish would be refused.
``GET /api/topics``
    ``{"topics": {subscription topic: local subscribers}}``.
``GET /api/connections``
    ``{"connections": [{id, user, remote, subscriptions, queued_bytes}]}``.
"""

from __future__ import annotations

from typing import Any

import orjson

from dwsps.errors import ErrorCode, ProtocolError
from dwsps.http import (
    HttpRequest,
    HttpResponse,
    HttpRoutes,
    KeyCheck,
    json_response,
    unauthorized,
)
from dwsps.hub import Hub
from dwsps.messages import Publish, position_fields, request_from_object

MAX_BATCH = 1000
"""Most publishes in one ``POST /api/publish`` array."""


class HttpApi:
    """The ``/api/*`` routes of one server."""

    def __init__(self, hub: Hub, api_key: str) -> None:
        self._hub = hub
        self._key = KeyCheck(api_key)

    def register(self, routes: HttpRoutes) -> None:
        """Add the API's paths to ``routes``."""
        routes.add("/api/publish", self._publish, ("POST",), self._guard)
        routes.add("/api/topics", self._topics, guard=self._guard)
        routes.add("/api/connections", self._connections, guard=self._guard)

    def _guard(self, request: HttpRequest) -> HttpResponse | None:
        # Before the body is read: a request without the key gets 401, not 413.
        return None if self._key.allows(request) else _unauthorized()

    def _publish(self, request: HttpRequest) -> HttpResponse:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return _error(ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}"))
        if self._hub.over_budget:
            overloaded = ProtocolError(
                ErrorCode.OVERLOADED, "the server is over its memory budget; try again later"
            )
            return _error(overloaded, status=503)
        items = body if isinstance(body, list) else [body]
        if isinstance(body, list) and not 0 < len(body) <= MAX_BATCH:
            detail = f"a batch holds 1 to {MAX_BATCH} publishes"
            return _error(ProtocolError(ErrorCode.INVALID_MESSAGE, detail, "publish"))
        pubs: list[Publish] = []
        for index, item in enumerate(items):
            try:
                pubs.append(self._parse(item))
            except ProtocolError as err:
                return _error(err, index if isinstance(body, list) else None)
        deliveries = sum(self._hub.route(pub, "http") for pub in pubs)
        if isinstance(body, list):
            return json_response({"published": len(pubs), "deliveries": deliveries})
        reply: dict[str, Any] = {"deliveries": deliveries}
        if pubs[0].position is not None:
            reply.update(position_fields(pubs[0].position))
        return json_response(reply)

    def _parse(self, item: object) -> Publish:
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a publish must be a JSON object")
        if "topic" not in item:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "missing 'topic'", "publish")
        req = request_from_object(
            {"type": "publish", "topic": item["topic"], "message": item.get("message")},
            self._hub.config.topic_limits,
        )
        assert isinstance(req, Publish)
        return req

    def _topics(self, request: HttpRequest) -> HttpResponse:
        return json_response({"topics": self._hub.router.topic_counts()})

    def _connections(self, request: HttpRequest) -> HttpResponse:
        router = self._hub.router
        rows: list[dict[str, Any]] = [
            {
                "id": conn.client_id,
                "user": conn.user,
                "remote": conn.remote,
                "subscriptions": sorted(router.subscriptions(conn)),
                "queued_bytes": conn.queued_bytes,
            }
            for conn in self._hub.connections.values()
        ]
        return json_response({"connections": rows})


def _unauthorized() -> HttpResponse:
    return unauthorized("a valid API key")


def _error(err: ProtocolError, index: int | None = None, status: int = 400) -> HttpResponse:
    doc: dict[str, Any] = {"error": str(err.code), "detail": err.detail}
    if index is not None:
        doc["index"] = index
    return json_response(doc, status)
