"""The exception tree. API errors carry an HTTP status and a stable code; the
middleware in ``api/middleware.py`` is the one place they become responses.

    ApiError                      -> {"error": {"code", "message", "field"?}}
      InvalidRequest      422       invalid_request (bad field value; ``field`` names it)
        Unsupported       422       unsupported (a field whose behaviour is not built yet)
        IdempotencyKeyReused 422    idempotency_key_reused
      BadRequest          400       bad_json, ...
      Unauthorized        401       unauthorized
      PaymentRequired     402       insufficient_credits
      Forbidden           403       forbidden / model_not_in_plan
      NotFound            404       not_found / run_not_found / repository_not_found
      Conflict            409       turn_in_progress, run_terminal, ...
      PayloadTooLarge     413       payload_too_large
      RequestTimeout      408       request_timeout (the body came too slowly)
      RateLimited         429       rate_limited (with Retry-After)
    RunFailure                    a run ended with ``error.code`` (never an HTTP error)
    TurnStop                      a turn ended early with ``error.code``; its work is kept, the run stays idle
"""

from __future__ import annotations


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, dict[str, str]]:
        err = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class InvalidRequest(ApiError):
    status = 422
    code = "invalid_request"


class Unsupported(InvalidRequest):
    code = "unsupported"


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class PaymentRequired(ApiError):
    status = 402
    code = "insufficient_credits"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(ApiError):
    """The request body did not arrive within ``limits.request_body_timeout_s``."""

    status = 408
    code = "request_timeout"


class RateLimited(ApiError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RunFailure(Exception):
    """A run cannot go on; ``code`` becomes the run's ``error.code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TurnStop(Exception):
    """A turn ended early (``budget_exceeded``, ``model_unreachable``): the work so far is kept
    and the run goes idle with ``code`` as its ``error.code``, usable for follow-ups.
    ``partial`` is the assistant text of the turn so far (its summary)."""

    def __init__(self, code: str, message: str, partial: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.partial = partial
