"""Credentials out of URLs, for logs, status pages and errors (pure: no I/O).

Every URL the server shows (peer links, the backplane) goes through
:func:`redact` first, so a password or token in it never reaches a log line,
``/health`` or an exception message.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK: Final = "***"
SECRET_PARAMETERS: Final = frozenset(
    {"peer_token", "token", "access_token", "password", "pass", "secret", "api_key", "apikey"}
)
"""Query parameters whose values are masked (compared case-insensitively)."""


def redact(url: str) -> str:
    """``url`` with its password (or a user name alone) and secret query parameters masked."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable: show nothing of it that could be secret
        return MASK if "@" in url or "?" in url else url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        # user:password keeps the user; a user alone is often a token itself.
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:{MASK}" if colon else MASK
        parts = parts._replace(netloc=f"{shown}@{hostport}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in SECRET_PARAMETERS for key, _ in query):
            masked = [(k, MASK if k.lower() in SECRET_PARAMETERS else v) for k, v in query]
            parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)
