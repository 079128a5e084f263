"""The README's Python examples run as written (with the port swapped for a free one)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests.procs import finish

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


async def _run(code: str, timeout: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await finish(proc, timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def test_readme_has_server_and_client_examples() -> None:
    blocks = _python_blocks()
    assert len(blocks) == 3
    assert "Server(port=8000)" in blocks[0]
    assert all("ws://localhost:8000" in block for block in blocks[1:])


async def test_readme_examples_run_against_the_readme_server() -> None:
    server_code, *client_codes = _python_blocks()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        server_code.replace("Server(port=8000)", "Server(port=0)"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    server_lines: list[str] = []
    try:
        assert server.stdout is not None
        first = await asyncio.wait_for(server.stdout.readline(), 20)
        server_lines.append(first.decode())
        match = re.search(r"listening on (ws://\S+)", first.decode())
        assert match, first
        url = match.group(1)

        code, out = await _run(client_codes[0].replace("ws://localhost:8000", url))
        assert code == 0, out
        assert "ack: {'type': 'ack', 'action': 'subscribe'" in out
        assert "news via news -> Hello news channel!" in out
        assert "news.uk via news -> Hello news.uk channel!" in out

        code, out = await _run(client_codes[1].replace("ws://localhost:8000", url))
        assert code == 0, out
        assert out.splitlines() == [
            "news: Hello news channel!",
            "news.uk: Hello news.uk channel!",
        ]

        # The server example logged both clients' subscriptions.
        async def two_subscribe_lines() -> None:
            assert server.stdout is not None
            while sum("subscribed to news" in line for line in server_lines) < 2:
                server_lines.append((await server.stdout.readline()).decode())

        await asyncio.wait_for(two_subscribe_lines(), 10)
    finally:
        server.terminate()
        await server.wait()
