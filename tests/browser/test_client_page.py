"""dwsps.js inside headless Chromium, imported cross-origin from a real ``dwsps serve``:
subscribe / publish / unsubscribe, error codes, order, reconnecting after a restart, two tabs
talking to each other, and the README's five-line snippet opened from a file."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from tests.browser.chrome import missing
from tests.support import unavailable

if reason := missing():
    unavailable(reason)

from tests.browser.conftest import Page
from tests.conftest import ClientFactory, PortFactory, ProcessFactory
from tests.support import eventually
from tests.wsclient import http_get

README = Path(__file__).resolve().parents[2] / "README.md"


async def test_subscribe_publish_unsubscribe(
    page: Page, pages_url: str, serve_process: ProcessFactory
) -> None:
    srv = await serve_process()
    page.open_client_page(pages_url, srv.url)
    acks = page.run(
        """
        const c = new dwsps.Client(server);
        window.c = c;
        const sub = await c.subscribe("news", got);
        const pub = await c.publish("news.uk", { headline: "hello" });
        return [sub.action, sub.topic, pub.action, pub.topic, typeof pub.id];
        """
    )
    assert acks == ["subscribe", "news", "publish", "news.uk", "number"]
    page.wait(lambda d: d.execute_script("return window.received.length") == 1, "the delivery")
    after = page.run(
        """
        const unsub = await c.unsubscribe("news");
        await c.subscribe("other", got);
        await c.publish("news", "not for us any more");
        // The server queues a publisher's own deliveries before the ack: they are in.
        await c.publish("other", "last");
        return [unsub.action, window.received, c.subscriptions];
        """
    )
    assert after == [
        "unsubscribe",
        [["news.uk", "news", {"headline": "hello"}], ["other", "other", "last"]],
        ["other"],
    ]


async def test_errors_reject_with_their_code(
    page: Page, pages_url: str, serve_process: ProcessFactory
) -> None:
    srv = await serve_process()
    page.open_client_page(pages_url, srv.url)
    codes = page.run(
        """
        const c = new dwsps.Client(server);
        const code = (p) => p.then(() => "resolved", (e) => [e.name, e.code, e instanceof Error]);
        const out = [await code(c.subscribe("news..uk")), await code(c.publish("news.*", 1))];
        out.push((await c.publish("news", "still open")).action);
        c.close();
        out.push(await code(c.publish("news", 1)));
        return out;
        """
    )
    assert codes == [
        ["DwspsError", "invalid_topic", True],
        ["DwspsError", "invalid_topic", True],
        "publish",
        ["DwspsError", "closed", True],
    ]


async def test_deliveries_keep_publish_order(
    page: Page, pages_url: str, serve_process: ProcessFactory
) -> None:
    srv = await serve_process()
    page.open_client_page(pages_url, srv.url)
    result = page.run(
        """
        const c = new dwsps.Client(server);
        const seen = [];
        await c.subscribe("order", (d) => seen.push(d.message));
        const publishes = Array.from({ length: 500 }, (_, i) => c.publish("order", i));
        const acks = await Promise.all(publishes); // each after its own delivery
        const ids = acks.map((a) => a.id);
        const rising = ids.every((v, i) => !i || v > ids[i - 1]);
        return [seen.length, seen.every((v, i) => v === i), rising];
        """
    )
    assert result == [500, True, True]


async def test_reconnects_and_resubscribes_after_a_restart(
    page: Page, pages_url: str, serve_process: ProcessFactory, reserve_port: PortFactory
) -> None:
    port = reserve_port().port
    srv = await serve_process(port=port)
    # While the server is down the browser logs each refused reconnect attempt.
    page.allow(rf"WebSocket connection to 'ws://127\.0\.0\.1:{port}/' failed")
    page.open_client_page(pages_url, srv.url)
    page.run(
        """
        const c = new dwsps.Client(server, { backoffInitial: 50, backoffMax: 500 });
        window.c = c;
        window.events = [];
        for (const e of ["disconnect", "reconnect"]) c.on(e, () => window.events.push(e));
        await c.subscribe("restart", got);
        await c.publish("restart", "before");
        """
    )
    await srv.stop()
    page.wait(
        lambda d: d.execute_script("return window.events.includes('disconnect')"), "disconnect"
    )
    await serve_process(port=port)
    page.wait(lambda d: d.execute_script("return window.events.includes('reconnect')"), "reconnect")
    page.run('await c.publish("restart", "after");')
    page.wait(lambda d: d.execute_script("return window.received.length") == 2, "the delivery")
    assert page.driver.execute_script("return window.received.map((r) => r[2])") == [
        "before",
        "after",
    ]


async def test_two_tabs_talk_to_each_other(
    page: Page, pages_url: str, serve_process: ProcessFactory
) -> None:
    srv = await serve_process()
    driver = page.driver
    tabs = []
    for _tab in ("alice", "bob"):
        if tabs:
            driver.switch_to.new_window("tab")
        tabs.append(driver.current_window_handle)
        page.open_client_page(pages_url, srv.url)
        page.run(
            """
            window.c = new dwsps.Client(server);
            await c.subscribe("chat", got);
            """
        )
    driver.switch_to.window(tabs[0])
    page.run('await c.publish("chat.room", "hi bob");')
    driver.switch_to.window(tabs[1])
    page.wait(lambda d: d.execute_script("return window.received.length") == 1, "bob's delivery")
    page.run('await c.publish("chat.room", "hi alice");')
    want = [["chat.room", "chat", "hi bob"], ["chat.room", "chat", "hi alice"]]
    page.wait(lambda d: d.execute_script("return window.received") == want, "bob's deliveries")
    driver.switch_to.window(tabs[0])
    page.wait(lambda d: d.execute_script("return window.received") == want, "alice's deliveries")


def readme_snippet() -> str:
    """The HTML snippet of the README (the ```html block that imports /dwsps.js)."""
    blocks = re.findall(r"```html\n(.*?)```", README.read_text(), re.S)
    snippets = [b for b in blocks if "/dwsps.js" in b]
    assert snippets, "README.md has no ```html snippet importing /dwsps.js"
    return snippets[0]


async def test_the_readme_snippet_works_from_a_file(
    page: Page, serve_process: ProcessFactory, open_client: ClientFactory, tmp_path: Path
) -> None:
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) <= 5
    srv = await serve_process()
    html = tmp_path / "snippet.html"
    html.write_text(snippet.replace("localhost:8000", f"127.0.0.1:{srv.port}"))
    page.driver.get(html.as_uri())  # file://: the import of /dwsps.js is cross-origin

    async def subscribed() -> bool:
        _, body = await http_get(srv.url, "/health")
        return bool(orjson.loads(body)["subscriptions"] == 1)

    await eventually(subscribed, "the snippet page to subscribe")
    publisher = await open_client(srv.url)
    await publisher.publish("news", {"headline": "hello"})
    body = page.wait(
        lambda d: "news:" in (text := d.find_element("tag name", "body").text) and text,
        "the delivery on the page",
    )
    assert 'news: {"headline":"hello"}' in body


async def test_the_console_check_sees_errors(page: Page, pages_url: str) -> None:
    # The `page` fixture's "no console errors" rule must be able to fail.
    from tests.browser.chrome import console_errors

    page.driver.get(f"{pages_url}/client.html?server=ws://127.0.0.1:9")
    page.driver.execute_script("console.error('deliberate')")
    errors = console_errors(page.driver, [])
    assert any("deliberate" in e for e in errors), errors
