"""Take docs/console.png: the web console in headless Chromium while traffic flows.

    .venv/bin/python -m tests.browser.screenshot [docs/console.png] [--dark]

Starts its own ``dwsps serve`` on a free port, subscribes the console to ``*``, publishes a
few hundred messages a second on several topics for a few seconds (bounded), publishes one
message from the console's own form, then saves the picture and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
from pathlib import Path
from typing import Any

from tests.browser.chrome import missing, new_driver
from tests.procs import ServerProcess
from tests.wsclient import RawClient

SECONDS = 20
TOPICS = ("orders.eu", "orders.us", "chat.lobby", "sensors.k7.temp", "news.uk")


def _message(topic: str, i: int, rng: random.Random) -> Any:
    if topic.startswith("orders"):
        return {
            "order": 41000 + i,
            "items": rng.randint(1, 5),
            "total": round(rng.uniform(5, 300), 2),
        }
    if topic.startswith("chat"):
        return {
            "user": rng.choice(["ana", "bo", "chen", "dee"]),
            "text": rng.choice(["hi!", "on my way", "see you there", "lunch?"]),
        }
    if topic.startswith("sensors"):
        return {"celsius": round(21 + 3 * math.sin(i / 40) + rng.random(), 2), "seq": i}
    return {"headline": f"Story {i}", "tags": ["uk", "live"]}


async def _traffic(url: str, stop: asyncio.Event) -> None:
    rng = random.Random(7)
    client = await RawClient.connect(url)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        while not stop.is_set() and loop.time() - start < SECONDS + 10:
            # a rate that swells and falls, so the chart has a shape
            rate = 150 + 250 * (1 + math.sin((loop.time() - start) / 1.5)) / 2
            for _ in range(max(1, int(rate / 20))):
                topic = rng.choice(TOPICS)
                await client.send_request(
                    {"type": "publish", "topic": topic, "message": _message(topic, i, rng)}
                )
                i += 1
            client.inbox.clear()
            await asyncio.sleep(0.05)
    finally:
        await client.close()


def _drive(driver: Any, http_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{http_url}/console")
    WebDriverWait(driver, 10).until(lambda d: "connected" in d.find_element(By.ID, "status").text)
    for topic in ("*", "orders", "sensors.*.temp"):
        driver.find_element(By.ID, "sub-topic").send_keys(topic, Keys.ENTER)


def _finish(driver: Any, out: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "pub-topic").send_keys("news.uk")
    box = driver.find_element(By.ID, "pub-message")
    box.clear()
    box.send_keys('{"headline": "Console says hello", "priority": 1}', Keys.CONTROL, Keys.ENTER)
    WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.ID, "pub-result").text.startswith("ack")
    )
    driver.execute_script("document.activeElement.blur()")
    driver.save_screenshot(str(out))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/console.png", type=Path)
    parser.add_argument("--dark", action="store_true", help="dark colour scheme")
    args = parser.parse_args()
    if reason := missing():
        raise SystemExit(reason)
    server = await ServerProcess().start()
    driver = await asyncio.to_thread(new_driver, 1360, 1040, args.dark)
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(_drive, driver, server.url.replace("ws://", "http://"))
        traffic = asyncio.create_task(_traffic(server.url, stop))
        await asyncio.sleep(SECONDS)  # a picture of a running system: let the chart fill
        await asyncio.to_thread(_finish, driver, args.out)
        stop.set()
        await traffic
    finally:
        stop.set()
        await asyncio.to_thread(driver.quit)
        await server.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
