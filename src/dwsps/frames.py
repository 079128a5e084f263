"""Server-side WebSocket frame bytes (pure: no I/O).

Server frames are unmasked (RFC 6455 section 5.1), so one encoded frame can be
written unchanged to every subscriber of a delivery.
"""

from __future__ import annotations

import struct

_OP_TEXT = 0x1
_FIN = 0x80
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame holding ``payload`` (already UTF-8)."""
    n = len(payload)
    b0 = _FIN | _OP_TEXT
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return _PACK_16(b0, 126, n) + payload
    return _PACK_64(b0, 127, n) + payload
