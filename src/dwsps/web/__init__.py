"""The browser side, served by the server itself on its own port (PROTOCOL.md, "HTTP endpoints").

* ``GET /dwsps.js`` — the JavaScript client, an ES module. The file in this package is a
  symlink to ``clients/js/dwsps.js`` (the npm package's source), so the server and the
  package ship the same bytes; a wheel carries the file itself (package-data).
* ``GET /console`` — the web console (``console.html``), with ``/console/console.js`` and
  ``/console/console.css``; plain ES modules, no build step.

Answers carry an ETag and ``Cache-Control: no-cache``: a browser keeps its copy and
revalidates, so a server upgrade is picked up at once and an unchanged file costs a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from dwsps.http import Handler, HttpRequest, HttpResponse

JAVASCRIPT = "text/javascript; charset=utf-8"

# The console talks to any dwsps server the operator names (ws: and its /health over http:),
# but runs only its own scripts and styles.
_CONSOLE_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss: http: https:; "
    "img-src 'self' data:; style-src 'self'; script-src 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file of this package served at ``path``."""

    path: str
    resource: str
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


FILES = (
    # Any page may import the client, from any origin (the README's snippet runs from file://).
    StaticFile("/dwsps.js", "dwsps.js", JAVASCRIPT, (("Access-Control-Allow-Origin", "*"),)),
    StaticFile(
        "/console",
        "console.html",
        "text/html; charset=utf-8",
        (("Content-Security-Policy", _CONSOLE_CSP), ("X-Frame-Options", "DENY")),
    ),
    StaticFile("/console/console.js", "console.js", JAVASCRIPT),
    StaticFile("/console/console.css", "console.css", "text/css; charset=utf-8"),
)


def read(resource: str) -> bytes:
    """The bytes of a file of this package."""
    return resources.files(__name__).joinpath(resource).read_bytes()


@cache
def _answers(file: StaticFile) -> tuple[HttpResponse, HttpResponse]:
    """``(200, 304)`` for ``file``: read and hashed once per process."""
    body = read(file.resource)
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        **dict(file.headers),
    }
    return (
        HttpResponse(200, body, file.content_type, headers),
        HttpResponse(304, b"", file.content_type, headers),
    )


def _handler(file: StaticFile) -> Handler:
    def answer(request: HttpRequest) -> HttpResponse:
        full, not_modified = _answers(file)
        tags = request.headers.get("If-None-Match", "")
        if full.headers["ETag"] in (tag.strip() for tag in tags.split(",")):
            return not_modified
        return full

    return answer


def routes() -> dict[str, Handler]:
    """Path -> handler for every file the server serves to browsers."""
    return {file.path: _handler(file) for file in FILES}
