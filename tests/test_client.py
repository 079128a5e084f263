"""The asyncio client against real servers (in-process dwsps servers, or scripted
``websockets`` servers for the misbehaviours a dwsps server never shows).

Nothing sleeps to wait: tests await futures that events resolve, bounded by
timeouts scaled with ``DWSPS_TEST_TIME_SCALE``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

import dwsps
from dwsps import AckTimeout, Client, ConnectionClosed, Server
from dwsps.errors import ConnectionLost, InvalidTopicError, TooManySubscriptionsError
from tests.support import scaled

T = TypeVar("T")
WAIT = scaled(5.0)

ClientFactory = Callable[..., Awaitable[Client]]


async def wait(aw: Awaitable[T]) -> T:
    """Await ``aw`` within the (scaled) test timeout."""
    return await asyncio.wait_for(aw, WAIT)


def future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def resolve(fut: asyncio.Future[Any]) -> Callable[..., None]:
    """An event handler that resolves ``fut`` with its arguments (first call wins)."""

    def handler(*args: Any) -> None:
        if not fut.done():
            fut.set_result(args[0] if len(args) == 1 else args)

    return handler


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Connect clients (fast reconnect settings); every one is closed after the test."""
    clients: list[Client] = []

    async def make(url: str, **options: Any) -> Client:
        options.setdefault("backoff_initial", 0.02)
        options.setdefault("backoff_max", 0.2)
        options.setdefault("request_timeout", WAIT)
        client = Client(url, **options)
        clients.append(client)
        return await client.connect()

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


@contextlib.asynccontextmanager
async def scripted_server(
    handler: Callable[[ServerConnection], Awaitable[None]],
) -> AsyncIterator[str]:
    """A plain ``websockets`` server running ``handler`` per connection; yields its URL."""
    async with serve(handler, "127.0.0.1", 0) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


# -- requests and acks --------------------------------------------------------


async def test_requests_return_their_own_ack(server: Server, make_client: ClientFactory) -> None:
    client = await make_client(server.url)
    ack = await client.subscribe("news")
    assert ack["type"] == "ack"
    assert ack["action"] == "subscribe"
    assert ack["topic"] == "news"
    assert isinstance(ack["id"], int)
    # Concurrent requests: each call gets the ack for its own request.
    topics = [f"t{i}.x" for i in range(20)]
    acks = await wait(asyncio.gather(*(client.publish(t, i) for i, t in enumerate(topics))))
    assert [a["topic"] for a in acks] == topics
    assert all(a["action"] == "publish" for a in acks)
    assert len({a["id"] for a in acks} | {ack["id"]}) == 21
    unack = await client.unsubscribe("news")
    assert (unack["action"], unack["topic"]) == ("unsubscribe", "news")
    assert client.subscriptions == ()


async def test_invalid_topics_raise_before_sending(
    server: Server, make_client: ClientFactory
) -> None:
    client = await make_client(server.url)
    sent: list[Any] = []
    client.on("ack", sent.append)
    client.on("error", sent.append)
    for bad in ("news..uk", "", ".news", "news uk"):
        with pytest.raises(InvalidTopicError) as info:
            await client.subscribe(bad)
        assert info.value.code == "invalid_topic"
    with pytest.raises(InvalidTopicError, match="'\\*' level"):
        await client.publish("news.*", "x")
    ack = await client.subscribe("news.*.weather")  # a wildcard is fine in a subscription
    assert ack["topic"] == "news.*.weather"
    assert len(sent) == 1  # only the valid subscribe reached the server


async def test_error_replies_raise_typed_errors(
    make_server: Callable[..., Awaitable[Server]], make_client: ClientFactory
) -> None:
    server = await make_server(max_topic_length=10, max_subscriptions=1)
    client = await make_client(server.url)
    errors: list[dict[str, Any]] = []
    client.on("error", errors.append)
    with pytest.raises(InvalidTopicError) as info:
        await client.publish("a.very.long.topic", 1)  # valid shape, over the server's limit
    reply = info.value.reply
    assert reply["type"] == "error"
    assert reply["action"] == "publish"
    assert isinstance(reply["id"], int)
    await client.subscribe("one")
    with pytest.raises(TooManySubscriptionsError):
        await client.subscribe("two")
    assert [e["error"] for e in errors] == ["invalid_topic", "too_many_subscriptions"]
    assert client.subscriptions == ("one",)
    # The connection is still usable after error replies.
    assert (await client.publish("one", "ok"))["action"] == "publish"


# -- deliveries -----------------------------------------------------------------


async def test_handlers_are_called_by_context(server: Server, make_client: ClientFactory) -> None:
    client = await make_client(server.url)
    news: list[dict[str, Any]] = []
    news_uk: list[dict[str, Any]] = []
    done = future()

    def on_news(msg: dict[str, Any]) -> None:
        news.append(msg)
        if msg["message"] == "end":
            done.set_result(None)

    async def on_news_uk(msg: dict[str, Any]) -> None:  # async handlers work too
        news_uk.append(msg)

    messages: list[dict[str, Any]] = []
    client.on("message", messages.append)
    await client.subscribe("news", on_news)
    await client.subscribe("news.uk", on_news_uk)
    await client.publish("news.uk.london", "hello")
    await client.publish("news", "end")  # only the news handler; in order after "hello"
    await wait(done)
    # The async handler's task was scheduled with "hello", before "end" resolved `done`.
    assert [(m["topic"], m["context"], m["message"]) for m in news] == [
        ("news.uk.london", "news", "hello"),
        ("news", "news", "end"),
    ]
    assert [(m["topic"], m["context"]) for m in news_uk] == [("news.uk.london", "news.uk")]
    assert len(messages) == 3  # the message event sees every delivery


async def test_subscribing_again_replaces_the_handler(
    server: Server, make_client: ClientFactory
) -> None:
    client = await make_client(server.url)
    first: list[Any] = []
    second = future()
    await client.subscribe("news", first.append)
    await client.subscribe("news", resolve(second))
    await client.publish("news", 1)
    assert (await wait(second))["message"] == 1
    assert first == []


async def test_async_iteration_yields_deliveries_in_order(
    server: Server, make_client: ClientFactory
) -> None:
    client = await make_client(server.url)
    await client.subscribe("feed")
    for i in range(5):
        await client.publish("feed.items", i)
    got = []
    async for msg in client:
        got.append(msg["message"])
        if len(got) == 5:
            break
    assert got == [0, 1, 2, 3, 4]


async def test_full_queue_drops_the_oldest_and_counts(
    server: Server, make_client: ClientFactory
) -> None:
    client = await make_client(server.url, queue_size=2)
    fifth = future()
    client.on("message", lambda m: m["message"] == 4 and resolve(fifth)(m))
    await client.subscribe("feed")
    for i in range(5):
        await client.publish("feed", i)
    await wait(fifth)
    assert client.dropped == 3
    assert [(await wait(anext(client)))["message"] for _ in range(2)] == [3, 4]


async def test_close_ends_iteration(server: Server, make_client: ClientFactory) -> None:
    client = await make_client(server.url)
    await client.subscribe("feed")
    await client.publish("feed", "kept")

    async def consume() -> list[Any]:
        return [msg["message"] async for msg in client]

    task = asyncio.create_task(consume())
    await client.close()
    # Deliveries received before close() are still handed out, then iteration ends.
    assert await wait(task) == ["kept"]
    assert client.closed
    assert client.close_code == 1000
    with pytest.raises(ConnectionClosed):
        await client.publish("feed", "late")


# -- events, connect forms --------------------------------------------------------


async def test_events_fire(server: Server) -> None:
    client = Client(server.url)
    seen: list[str] = []
    closed = future()
    client.on("open", lambda: seen.append("open"))
    client.on("ack", lambda ack: seen.append(f"ack:{ack['action']}"))
    client.on("message", lambda msg: seen.append(f"message:{msg['message']}"))
    client.on("error", lambda err: seen.append(f"error:{err['error']}"))

    @client.on("close")
    def on_close(code: int, reason: str) -> None:
        closed.set_result(code)

    async with client:
        await client.subscribe("news")
        await client.publish("news", "hi")
        with pytest.raises(dwsps.RequestError):
            await client.publish("x" * 300, 1)  # over the default 256-character limit
        assert client.connected
    assert await wait(closed) == 1000
    assert seen == [
        "open",
        "ack:subscribe",
        "message:hi",
        "ack:publish",
        "error:invalid_topic",
    ]


async def test_connect_function_both_forms(server: Server) -> None:
    async with dwsps.connect(server.url) as client:
        assert isinstance(client, Client)
        assert client.connected
        ack = await client.publish("news", None)
        assert ack["action"] == "publish"
    assert client.closed
    client2 = await dwsps.connect(server.url)
    try:
        assert client2.connected
    finally:
        await client2.close()
    assert not client2.connected


async def test_connect_failure_raises_connection_closed(
    make_server: Callable[..., Awaitable[Server]],
) -> None:
    server = await make_server()
    url = server.url
    await server.close()  # nothing listens on that port now
    client = Client(url, open_timeout=WAIT)
    with pytest.raises(ConnectionClosed, match="could not connect"):
        await client.connect()
    with pytest.raises(RuntimeError):
        await Client(url).publish("news", 1)  # never connected: misuse, not a network error


# -- timeouts and connection loss ------------------------------------------------


async def test_unanswered_request_times_out() -> None:
    received = future()

    async def silent(ws: ServerConnection) -> None:
        async for frame in ws:
            if not received.done():
                received.set_result(orjson.loads(frame))

    async with (
        scripted_server(silent) as url,
        Client(url, request_timeout=scaled(0.3)) as client,
    ):
        with pytest.raises(AckTimeout):
            await client.publish("news", "anyone?")
        request = await wait(received)
    assert request["type"] == "publish"
    assert isinstance(request["id"], int)
    assert "timestamp" in request  # like the original client


async def test_acks_without_id_are_matched_in_order() -> None:
    """The original Node.js server does not echo ``id``: replies still find their request."""

    async def no_ids(ws: ServerConnection) -> None:
        async for frame in ws:
            req = orjson.loads(frame)
            reply = {"type": "ack", "action": req["type"], "topic": req["topic"], "n": 0}
            await ws.send(orjson.dumps(reply).decode())

    async with scripted_server(no_ids) as url, Client(url) as client:
        acks = await wait(asyncio.gather(*(client.publish("a", i) for i in range(3))))
    assert [a["topic"] for a in acks] == ["a", "a", "a"]
    assert "id" not in acks[0]


async def test_policy_close_is_final() -> None:
    async def reject(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.close(1008, "authentication failed")

    async with scripted_server(reject) as url:
        client = Client(url, backoff_initial=0.01)
        closed = future()
        client.on("close", lambda code, reason: resolve(closed)((code, reason)))
        await client.connect()
        try:
            with pytest.raises(ConnectionClosed):
                await client.subscribe("news")
            assert await wait(closed) == (1008, "authentication failed")
            assert client.closed
            assert not client.connected
            with pytest.raises(ConnectionClosed, match="1008"):
                await anext(client)  # iteration reports the final close
        finally:
            await client.close()


async def test_in_flight_requests_after_a_drop() -> None:
    """A dropped subscribe is sent again on the next connection; a dropped publish
    raises ConnectionLost (it may have been delivered)."""
    connections = 0

    async def flaky(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        async for frame in ws:
            req = orjson.loads(frame)
            if first:
                ws.transport.abort()  # drop without answering
                return
            ack = {"type": "ack", "action": req["type"], "topic": req["topic"], "id": req["id"]}
            await ws.send(orjson.dumps(ack).decode())

    async with scripted_server(flaky) as url:
        async with Client(url, backoff_initial=0.01, backoff_max=0.05) as client:
            ack = await wait(client.subscribe("news"))
            assert ack["topic"] == "news"
            assert connections == 2
            assert client.subscriptions == ("news",)
        connections = 0
        async with Client(url, backoff_initial=0.01, backoff_max=0.05) as client:
            with pytest.raises(ConnectionLost):
                await wait(client.publish("news", 1))


async def test_reconnects_resubscribes_and_delivers_again(make_client: ClientFactory) -> None:
    first = Server(host="127.0.0.1", port=0)
    await first.start()
    port = first.port
    second: Server | None = None
    try:
        client = await make_client(first.url)
        got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await client.subscribe("news", got.put_nowait)
        await client.publish("news.uk", "before")
        assert (await wait(got.get()))["message"] == "before"

        dropped = future()
        reconnected = future()
        client.on("disconnect", lambda code, reason: resolve(dropped)(code))
        client.on("reconnect", lambda: resolve(reconnected)(True))
        await first.close()
        assert await wait(dropped) == 1001  # going away
        assert not client.connected
        # A request made while disconnected waits for the reconnection.
        pending = asyncio.create_task(client.publish("news.uk", "during"))

        second = Server(host="127.0.0.1", port=port)
        await second.start()
        await wait(reconnected)
        assert client.connected
        assert (await wait(pending))["action"] == "publish"
        assert (await wait(got.get()))["message"] == "during"
        # Deliveries from another client reach the resubscribed handler.
        other = await make_client(second.url)
        await other.publish("news.fr", "after")
        delivery = await wait(got.get())
        assert (delivery["message"], delivery["context"]) == ("after", "news")
        assert client.subscriptions == ("news",)
    finally:
        await first.close()
        if second is not None:
            await second.close()


async def test_gives_up_after_max_reconnect_attempts(
    make_server: Callable[..., Awaitable[Server]],
) -> None:
    server = await make_server()
    client = Client(server.url, backoff_initial=0.01, backoff_max=0.02, max_reconnect_attempts=2)
    closed = future()
    client.on("close", lambda code, reason: resolve(closed)(code))
    await client.connect()
    try:
        await server.close()
        assert await wait(closed) == 1006
        await wait(client.wait_closed())
        assert client.closed
        with pytest.raises(ConnectionClosed, match="gave up"):
            await client.publish("news", 1)
    finally:
        await client.close()


async def test_no_reconnect_when_disabled(server: Server) -> None:
    client = Client(server.url, reconnect=False)
    closed = future()
    client.on("close", lambda code, reason: resolve(closed)(code))
    await client.connect()
    try:
        await server.close()
        assert await wait(closed) == 1001
        with pytest.raises(ConnectionClosed):
            await client.subscribe("news")
    finally:
        await client.close()


async def test_close_stops_reconnecting(make_server: Callable[..., Awaitable[Server]]) -> None:
    server = await make_server()
    client = Client(server.url, backoff_initial=0.01, backoff_max=0.05)
    dropped = future()
    client.on("disconnect", lambda code, reason: resolve(dropped)(code))
    await client.connect()
    await server.close()
    await wait(dropped)
    waiting = asyncio.create_task(client.subscribe("news"))  # waits for a reconnection
    await wait(client.close())
    assert client.close_code == 1000
    with pytest.raises(ConnectionClosed, match="client is closed"):
        await wait(waiting)
    assert client._reconnect_task is None or client._reconnect_task.done()


async def test_raising_handlers_do_not_break_the_client(
    server: Server, make_client: ClientFactory
) -> None:
    client = await make_client(server.url)
    later = future()

    def broken(msg: dict[str, Any]) -> None:
        if msg["message"] == "boom":
            raise RuntimeError("handler bug")
        resolve(later)(msg)

    client.on("message", lambda msg: 1 / 0)  # an event handler that always raises
    await client.subscribe("news", broken)
    await client.publish("news", "boom")
    await client.publish("news", "fine")
    assert (await wait(later))["message"] == "fine"
    assert client.connected
