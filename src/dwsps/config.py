"""Server configuration: one dataclass that the API and the CLI both fill."""

from __future__ import annotations

from dataclasses import dataclass, field

from dwsps.topics import TopicLimits

MIB = 1024 * 1024


@dataclass(slots=True)
class ServerConfig:
    """Everything a :class:`~dwsps.server.Server` can be told.

    Sizes are bytes, times are seconds.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    peers: list[str] = field(default_factory=list)
    """URLs of servers this one forwards organic publishes to (one-directional)."""
    peer_tokens: dict[str, str] = field(default_factory=dict)
    """Outbound: token to present to a peer URL (sent as ``Authorization: Bearer``)."""
    accept_peer_tokens: list[str] = field(default_factory=list)
    """Inbound: when non-empty, only connections presenting one of these may send
    ``fromPeerServer`` publishes."""
    tls_cert: str = ""
    """PEM certificate chain file; when set, the server speaks ``wss://``."""
    tls_key: str = ""
    """PEM private key file (empty: the key is in ``tls_cert``)."""
    backplane: str = "memory://"
    """Backplane URL: ``memory://`` (embedded, single node) or ``redis://…``."""
    max_frame_size: int = 1 * MIB
    """Largest incoming message (a frame, or a fragmented message in total)."""
    max_topic_length: int = 256
    max_topic_levels: int = 32
    max_subscriptions: int = 1000
    """Per connection; more gets ``too_many_subscriptions``."""
    heartbeat_interval: float = 10.0
    """Ping every client this often; drop one that did not answer the previous ping."""
    max_outbound_buffer: int = 8 * MIB
    """A connection whose unsent data passes this is closed with 1013."""
    max_invalid_requests: int = 50
    """Consecutive bad requests after which a connection is closed with 1008."""
    handshake_timeout: float = 5.0
    close_timeout: float = 2.0
    """How long a graceful shutdown waits for clients to finish the close handshake."""
    peer_outbox_messages: int = 100_000
    """Per peer link: publishes held until the peer confirms them (oldest dropped first)."""
    peer_outbox_bytes: int = 64 * MIB
    """Per peer link: bytes held until the peer confirms them (oldest dropped first)."""
    peer_reconnect_min: float = 0.1
    """First reconnect delay of a peer link; doubles per failed attempt (with jitter)."""
    peer_reconnect_max: float = 5.0
    """Longest reconnect delay of a peer link."""
    backplane_buffer_messages: int = 100_000
    backplane_buffer_bytes: int = 64 * MIB

    @property
    def topic_limits(self) -> TopicLimits:
        """The topic limits as the pure layer wants them."""
        return TopicLimits(self.max_topic_length, self.max_topic_levels)
