"""Errors the gateway answers itself.

Every rejection is one ``GatewayError`` subclass; the server turns it into
``{"errorCode": ..., "errorMessage": ...}`` plus ``X-Gateway-Error``. The
``code`` is the contract's errorCode, the class name says the same thing.

    GatewayError
    ├── BadRequest (400)
    │   ├── InvalidRequest          not HTTP/1.0 or 1.1, not parseable, two Host headers,
    │   │                           a framing the gateway would not trust
    │   ├── InvalidPath
    │   ├── InvalidQuery            a query parameter the route's ``query:`` does not allow
    │   ├── InvalidJSON
    │   ├── InvalidBody
    │   ├── BatchEmpty
    │   ├── BatchTooLarge
    │   ├── InvalidItem
    │   └── DuplicateItems
    ├── Unauthorized (401)          reason: for the log only, never the caller
    ├── Forbidden (403)
    ├── RouteNotFound (404)
    ├── MethodNotAllowed (405)      carries the Allow header
    ├── RequestTimeout (408)        the body did not arrive within body_timeout_s
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415)
    ├── RateLimited (429)           Retry-After, RateLimit-Policy, RateLimit (gateway/limits.py)
    ├── ClientClosedRequest (499)   the caller hung up before its body arrived (logged only)
    ├── InternalError (500)         a fault in the gateway itself (logged with its traceback)
    ├── UpstreamUnavailable (502)   kind: connect | reset | protocol
    ├── ShuttingDown (503)
    ├── Overloaded (503)            no upstream slot free within queue_timeout_s
    ├── StateUnavailable (503)      the shared state (Redis) did not answer within state.timeout_s
    └── UpstreamTimeout (504)       kind: timeout

Upstream's own error answers are not GatewayErrors: they pass through as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "InternalError"

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}
        # Why the gateway said no, in words for the operator's log. For 401s this
        # is the only place the real reason goes: the caller learns nothing.
        self.reason = reason

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errorCode": self.code, "errorMessage": self.message}
        if self.details is not None:
            out["details"] = self.details
        return out


class BadRequest(GatewayError):
    status = 400


class InvalidRequest(BadRequest):
    code = "InvalidRequest"


class InvalidPath(BadRequest):
    code = "InvalidPath"


class InvalidQuery(BadRequest):
    code = "InvalidQuery"


class InvalidJSON(BadRequest):
    code = "InvalidJSON"


class InvalidBody(BadRequest):
    code = "InvalidBody"


class BatchEmpty(BadRequest):
    code = "BatchEmpty"


class BatchTooLarge(BadRequest):
    code = "BatchTooLarge"


class InvalidItem(BadRequest):
    code = "InvalidItem"


class DuplicateItems(BadRequest):
    code = "DuplicateItems"


class Unauthorized(GatewayError):
    status = 401
    code = "Unauthorized"

    def __init__(self, reason: str) -> None:
        # One message for every cause, so a caller cannot probe which check failed.
        super().__init__("Authentication required or credentials not accepted.", reason=reason)


class Forbidden(GatewayError):
    status = 403
    code = "Forbidden"


class RouteNotFound(GatewayError):
    status = 404
    code = "RouteNotFound"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "MethodNotAllowed"

    def __init__(self, method: str, allowed: tuple[str, ...]) -> None:
        super().__init__(
            f"Method {method} is not allowed here; allowed: {', '.join(allowed)}.",
            headers={"Allow": ", ".join(allowed)},
        )


class RequestTimeout(GatewayError):
    status = 408
    code = "RequestTimeout"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PayloadTooLarge"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "UnsupportedMediaType"


class RateLimited(GatewayError):
    status = 429
    code = "RateLimited"

    def __init__(self, message: str, *, limit: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.limit = limit  # the refusing limit's name, for gateway_rate_limited_total


class ClientClosedRequest(GatewayError):
    """Nobody reads this answer: it exists for the access log and the metrics
    (nginx's 499), so a caller hanging up is neither a 5xx nor a fault."""

    status = 499
    code = "ClientClosedRequest"


class InternalError(GatewayError):
    status = 500
    code = "InternalError"


class UpstreamUnavailable(GatewayError):
    status = 502
    code = "UpstreamUnavailable"


class ShuttingDown(GatewayError):
    status = 503
    code = "ShuttingDown"


class Overloaded(GatewayError):
    status = 503
    code = "Overloaded"


class StateUnavailable(GatewayError):
    status = 503
    code = "StateUnavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "UpstreamTimeout"
