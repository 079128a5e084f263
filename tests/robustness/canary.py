"""The canary process: ``python -m tests.robustness.canary URL INTERVAL``.

Subscribes to the canary topic, publishes ``time.monotonic()`` to it every
INTERVAL seconds on a second connection, and prints ``<receive time> <latency>``
per delivery (see :class:`tests.robustness.harness.Canary`). Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from tests.robustness.harness import CANARY_TOPIC
from tests.wsclient import RawClient, is_delivery


async def main(url: str, interval: float) -> None:
    sub = await RawClient.connect(url)
    pub = await RawClient.connect(url)
    await sub.subscribe(CANARY_TOPIC)

    async def publish() -> None:
        while True:
            await pub.send_json(
                {"type": "publish", "topic": CANARY_TOPIC, "message": time.monotonic()}
            )
            pub.take_all()  # the acks: not what we measure
            # Pacing, not waiting for an event: the canary's publish rate.
            await asyncio.sleep(interval)

    writer = asyncio.create_task(publish())
    out = sys.stdout
    while True:
        msg = await sub.next_message(is_delivery(CANARY_TOPIC), within=3600.0)
        now = time.monotonic()
        out.write(f"{now:.6f} {now - float(msg['message']):.6f}\n")
        out.flush()
        sub.deliveries.clear()
        if writer.done():
            writer.result()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
