"""The HTTP API: publishing and introspection for backends without a WebSocket.

Off (404) unless an API key is configured; every request must then carry
``Authorization: Bearer <key>`` (401 otherwise; checked by the routes' guard,
before the body is read). A publish made here goes
through the same path as a WebSocket publish (``Hub.route``: identity, local
delivery, peers and backplane, counters, the ``publish`` event), with the same
topic rules and error codes.

``POST /api/publish``
    ``{"topic": …, "message": …}`` → 200 ``{"deliveries": N}`` (plus ``stream``,
    ``offset``, ``epoch`` when the topic has history); or a JSON array
    of such objects → 200 ``{"published": n, "deliveries": N}``. Every item is
    validated before any is published; a bad one → 400 ``{"error", "detail",
    "index"}``. A body over the frame size limit → 413 (the listener; after
    404, 405 and 401). While the server is over its memory budget → 503
    ``overloaded``, as a WebSocket publish would be refused. A topic whose
    history lives in the backplane's engine (Redis) is answered once the engine
    assigned the offset (``Hub.route_kept``, a deferred answer), or 503
    ``overloaded`` (with the ``index`` of a batch item) as a WebSocket ack.
``GET /api/topics``
    ``{"topics": {subscription topic: local subscribers}}``.
``GET /api/connections``
    ``{"connections": [{id, user, remote, subscriptions, queued_bytes}]}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson

from dwsps.errors import ErrorCode, ProtocolError
from dwsps.http import (
    Answer,
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

    def _publish(self, request: HttpRequest) -> Answer:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return _error(ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}"))
        if self._hub.over_budget:
            overloaded = ProtocolError(
                ErrorCode.OVERLOADED, "the server is over its memory budget; try again later"
            )
            return _error(overloaded, status=503)
        batch = isinstance(body, list)
        items = body if batch else [body]
        if batch and not 0 < len(body) <= MAX_BATCH:
            detail = f"a batch holds 1 to {MAX_BATCH} publishes"
            return _error(ProtocolError(ErrorCode.INVALID_MESSAGE, detail, "publish"))
        pubs: list[Publish] = []
        for index, item in enumerate(items):
            try:
                pubs.append(self._parse(item))
            except ProtocolError as err:
                return _error(err, index if batch else None)
        deliveries = 0
        kept: list[tuple[int, Awaitable[dict[str, Any]]]] = []
        for index, pub in enumerate(pubs):
            # A topic whose history lives in Redis is delivered once Redis numbered it.
            waiting = self._hub.route_kept(pub, "http")
            if waiting is None:
                deliveries += self._hub.route(pub, "http")
            else:
                kept.append((index, waiting))
        if kept:
            return self._answer_kept(batch, pubs, deliveries, kept)
        position = pubs[0].position
        return _published(
            batch, len(pubs), deliveries, position_fields(position) if position else {}
        )

    async def _answer_kept(
        self,
        batch: bool,
        pubs: list[Publish],
        deliveries: int,
        kept: list[tuple[int, Awaitable[dict[str, Any]]]],
    ) -> HttpResponse:
        """The answer once every append was confirmed (as a WebSocket ack waits), or 503."""
        outcomes = await asyncio.gather(*(waiting for _, waiting in kept), return_exceptions=True)
        fields: dict[str, Any] = {}
        for (index, _), outcome in zip(kept, outcomes, strict=True):
            if isinstance(outcome, ProtocolError):
                # Not atomic: the batch's other publishes may have been kept.
                return _error(outcome, index if batch else None, status=503)
            if isinstance(outcome, BaseException):
                raise outcome
            fields = outcome
        return _published(batch, len(pubs), deliveries, fields)

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


def _published(batch: bool, count: int, deliveries: int, fields: dict[str, Any]) -> HttpResponse:
    """200: deliveries here (and, for one publish with history, its position)."""
    if batch:
        return json_response({"published": count, "deliveries": deliveries})
    return json_response({"deliveries": deliveries, **fields})


def _unauthorized() -> HttpResponse:
    return unauthorized("a valid API key")


def _error(err: ProtocolError, index: int | None = None, status: int = 400) -> HttpResponse:
    doc: dict[str, Any] = {"error": str(err.code), "detail": err.detail}
    if index is not None:
        doc["index"] = index
    return json_response(doc, status)
