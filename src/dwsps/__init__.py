"""dwsps: distributed publish/subscribe over WebSockets."""

from dwsps.client import Client, connect
from dwsps.config import ServerConfig
from dwsps.errors import (
    AckTimeout,
    CloseCode,
    ConnectionClosed,
    DwspsError,
    ErrorCode,
    ProtocolError,
    RequestError,
)
from dwsps.server import Server

__version__ = "0.1.0"

__all__ = [
    "AckTimeout",
    "Client",
    "CloseCode",
    "ConnectionClosed",
    "DwspsError",
    "ErrorCode",
    "ProtocolError",
    "RequestError",
    "Server",
    "ServerConfig",
    "__version__",
    "connect",
]
