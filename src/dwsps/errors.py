"""Error codes, close codes and the exception tree of dwsps.

Wire errors are values (an ``error`` reply with a code); inside Python they
are exceptions. Every code and close code the project uses is listed here::

    DwspsError
    ├── ProtocolError          the peer sent something invalid (server side)
    ├── RequestError           the server answered a request with an error (client side)
    │   └── ... one subclass per ErrorCode, see REQUEST_ERRORS
    ├── AuthError              a token or upgrade request failed authentication (server side)
    ├── AckTimeout             no reply to a request in time (client side; also a TimeoutError)
    ├── ConnectionClosed       the connection is gone (client side; also a ConnectionError)
    │   └── ConnectionLost     it went while a publish awaited its ack (maybe delivered)
    ├── PermissionDenied       a request is outside the connection's permissions (server side)
    ├── SubscriptionLimitError a subscriber holds as many subscriptions as it may (server side)
    ├── TopicError             a topic breaks the topic rules (also a ValueError)
    ├── ConfigError            a configuration source holds something invalid (also a ValueError)
    │   ├── SettingError       one named setting is unusable (startup checks, a port in use)
    │   ├── AuthConfigError    authentication settings are unusable: key, algorithm, secret
    │   └── HistoryConfigError a history pattern or bound is invalid
    ├── HistoryError           a recover/history request names no single stream (server side)
    ├── PermissionsError       a permission list (a token's dwsps claim) is malformed (ValueError)
    ├── EnvelopeError          a backplane message is not a dwsps envelope (also a ValueError)
    ├── TokenSourceError       a token or key named on the command line is unusable (ValueError)
    └── LineTooLong            a line of ``dwsps pub --lines`` input is over the limit (skipped)

The ``ValueError`` / ``TimeoutError`` / ``ConnectionError`` bases let callers that
do not know dwsps catch what they would expect. Private exceptions used as control
flow inside one module (``client._Lost``, ``links.redis._SessionLost``) never leave
it and are not part of the tree.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """Codes carried in the ``error`` field of an error reply."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_TOPIC = "invalid_topic"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"


class CloseCode(IntEnum):
    """WebSocket close codes the server sends, and what each one tells a client."""

    NORMAL = 1000
    """Normal closure."""
    GOING_AWAY = 1001
    """The server is shutting down; reconnecting elsewhere or later makes sense."""
    PROTOCOL_ERROR = 1002
    """The peer broke RFC 6455 framing."""
    INVALID_TEXT = 1007
    """A text frame was not valid UTF-8."""
    POLICY_VIOLATION = 1008
    """Authentication failed, or the client kept sending invalid input."""
    MESSAGE_TOO_BIG = 1009
    """A frame or message was larger than the configured maximum."""
    INTERNAL_ERROR = 1011
    """The server hit an unexpected condition."""
    TRY_AGAIN_LATER = 1013
    """Slow consumer (the connection's outbound buffer passed its limit), or the server
    is over its memory budget."""


class DwspsError(Exception):
    """Base class of every dwsps exception."""


class ProtocolError(DwspsError):
    """A request could not be accepted; becomes an ``error`` reply on the wire."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        action: str | None = None,
        request_id: str | int | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.action = action
        self.request_id = request_id


class AuthError(DwspsError):
    """Authentication failed; the message is a short reason fit to show the client.

    At the upgrade it becomes an HTTP 401 with ``reason`` as the plain-text
    body; for an ``auth`` request, an ``unauthorized`` error and a 1008 close.
    The reason never carries key material or token contents.
    """

    status = 401
    """The HTTP status of a failed upgrade."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestError(DwspsError):
    """The server replied to a request with an ``error`` message."""

    code: ErrorCode | str = ""

    def __init__(self, code: ErrorCode | str, detail: str, reply: dict[str, object]) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.reply = reply


class InvalidJsonError(RequestError):
    """The server could not parse the request as JSON."""


class InvalidMessageError(RequestError):
    """The request was not an object, or a field was missing or of the wrong type."""


class UnknownTypeError(RequestError):
    """The request's ``type`` is not one the server knows."""


class InvalidTopicError(RequestError):
    """The topic broke the topic rules."""


class ForbiddenError(RequestError):
    """The connection may not do this."""


class RateLimitedError(RequestError):
    """The connection sent requests too fast."""


class TooManySubscriptionsError(RequestError):
    """The connection holds as many subscriptions as it may."""


class UnauthorizedError(RequestError):
    """The server refused the token of an ``auth`` request (it closes the connection)."""


class OverloadedError(RequestError):
    """The server is over its memory budget and did not carry out the request; retry later."""


REQUEST_ERRORS: dict[str, type[RequestError]] = {
    ErrorCode.INVALID_JSON: InvalidJsonError,
    ErrorCode.INVALID_MESSAGE: InvalidMessageError,
    ErrorCode.UNKNOWN_TYPE: UnknownTypeError,
    ErrorCode.INVALID_TOPIC: InvalidTopicError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.RATE_LIMITED: RateLimitedError,
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: TooManySubscriptionsError,
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
    ErrorCode.OVERLOADED: OverloadedError,
}


def request_error(code: str, detail: str, reply: dict[str, object]) -> RequestError:
    """Build the typed exception for an error reply (unknown codes get the base class)."""
    cls = REQUEST_ERRORS.get(code, RequestError)
    return cls(code, detail, reply)


class AckTimeout(DwspsError, TimeoutError):
    """The server did not answer a request within the timeout."""


class ConnectionClosed(DwspsError, ConnectionError):
    """The connection closed before the request was answered."""


class ConnectionLost(ConnectionClosed):
    """The connection dropped while a publish awaited its ack.

    The publish may or may not have been delivered, so it is not sent again.
    """


class TopicError(DwspsError, ValueError):
    """A topic broke the rules; the message says how."""


class ConfigError(DwspsError, ValueError):
    """A configuration source holds something invalid; the message names the source and key."""


class SettingError(ConfigError):
    """A :class:`ConfigError` about one setting: ``setting`` (its field name) and ``problem``.

    ``label`` is how the message names the setting (``tls_cert (--tls-cert)``).
    """

    def __init__(self, setting: str, problem: str, label: str | None = None) -> None:
        super().__init__(f"{label or setting}: {problem}")
        self.setting = setting
        self.problem = problem


class AuthConfigError(ConfigError):
    """Authentication settings are unusable (bad key, algorithm, secret length, ...)."""


class PermissionsError(DwspsError, ValueError):
    """A permission list (a token's ``dwsps`` claim or a setting) is malformed."""


class EnvelopeError(DwspsError, ValueError):
    """A backplane message that is not a valid envelope."""


class SubscriptionLimitError(DwspsError):
    """A subscriber, or the server, is at its subscription limit (``too_many_subscriptions``)."""

    def __init__(self, limit: int, scope: str = "per connection") -> None:
        super().__init__(f"at most {limit} subscriptions {scope}")
        self.limit = limit


class PermissionDenied(DwspsError):
    """A request is outside the connection's permissions (the server replies ``forbidden``)."""


class HistoryError(DwspsError):
    """A ``recover`` or ``history`` request on a topic that does not lie inside one stream.

    The reply is an ``error`` with :attr:`code` and :attr:`detail`.
    """

    code = ErrorCode.INVALID_MESSAGE

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class HistoryConfigError(ConfigError):
    """A history pattern, size, age or byte cap in the configuration is invalid."""


class TokenSourceError(DwspsError, ValueError):
    """A token or key source named on the command line cannot be used (``dwsps.tokens``)."""


class LineTooLong(DwspsError):
    """A line of standard input longer than the limit; it was skipped up to its newline
    (``dwsps.stdin``)."""
