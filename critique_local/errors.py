"""The exception tree and every error code.

Every code a client can see (an HTTP error's ``error.code``, a run's ``error.code``) is a member
of :class:`ErrorCode`; the README documents each one (``tests/test_docs.py``). API errors carry
an HTTP status; the middleware in ``api/middleware.py`` is the one place they become responses.
Run errors end a run (or, for :class:`TurnStop`, a turn); the executor is the one place they
become a run's ``error``.

    ApiError                      -> {"error": {"code", "message", "field"?}}
      BadRequest          400       bad_json, ...
      InvalidRequest      422       invalid_request (bad field value; ``field`` names it)
        Unsupported       422       unsupported (a field whose behaviour is not built yet)
        IdempotencyKeyReused 422    idempotency_key_reused
        ProtectedBranch   422       protected_branch
        NetworkModeNotAllowed 422   network_mode_not_allowed
        NetworkModeNotSupported 422 network_mode_not_supported
        McpServersNeedNetwork 422   mcp_servers_need_network
      Unauthorized        401       unauthorized
      PaymentRequired     402       insufficient_credits
      BudgetExceeded      402       budget_exceeded (the gateway refuses a sandbox's model call)
      Forbidden           403       forbidden / model_not_in_plan
      NotFound            404       not_found / run_not_found / repository_not_found
      MethodNotAllowed    405       method_not_allowed
      NotAcceptable       406       not_acceptable (the MCP endpoint's Accept header)
      RequestTimeout      408       request_timeout (the body came too slowly)
      Conflict            409       conflict
        TurnInProgress    409       turn_in_progress
        RunTerminal       409       run_terminal
        SessionExpired    409       session_expired
      PayloadTooLarge     413       payload_too_large
      UnsupportedMediaType 415      unsupported_media_type
      RateLimited         429       rate_limited (with Retry-After)
      GatewayError        4xx/5xx   upstream_* (a provider's answer, mapped)
      McpServerUnreachable 502      mcp_server_unreachable (the MCP relay could not reach a run's server)
    RunError(code, message)       a run's ``error.code`` and ``error.message`` (never an HTTP error)
      RunFailure                    the run cannot go on: it fails
      SandboxError                  a sandbox operation failed (sandbox backends)
        SandboxGone                   sandbox_gone
      AgentError                    the agent in the sandbox failed or did not answer (agent harnesses)
      TurnStop                      a turn ended early; its work is kept, the run stays idle
        BudgetStop                    budget_exceeded
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every error code a client can see. A ``StrEnum``: members are the strings themselves."""

    # ---- API (HTTP) errors
    BAD_REQUEST = "bad_request"
    BAD_JSON = "bad_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_FIELD = "unknown_field"
    UNSUPPORTED = "unsupported"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    UNKNOWN_MODEL = "unknown_model"
    WEBHOOK_NOT_ALLOWED = "webhook_not_allowed"
    PROTECTED_BRANCH = "protected_branch"
    NETWORK_MODE_NOT_ALLOWED = "network_mode_not_allowed"
    NETWORK_MODE_NOT_SUPPORTED = "network_mode_not_supported"
    UNAUTHORIZED = "unauthorized"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    BYOK_KEY_MISSING = "byok_key_missing"
    FORBIDDEN = "forbidden"
    MODEL_NOT_IN_PLAN = "model_not_in_plan"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    NOT_FOUND = "not_found"
    RUN_NOT_FOUND = "run_not_found"
    REPOSITORY_NOT_FOUND = "repository_not_found"  # also a run error: the repository went away
    PATCH_NOT_FOUND = "patch_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    CONFLICT = "conflict"
    TURN_IN_PROGRESS = "turn_in_progress"
    RUN_TERMINAL = "run_terminal"
    SESSION_EXPIRED = "session_expired"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # the MCP endpoint and a run's mcpServers (api/mcp.py, runs/mcp_servers.py, gateway/mcp_relay.py)
    NOT_ACCEPTABLE = "not_acceptable"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    MCP_SERVERS_NEED_NETWORK = "mcp_servers_need_network"
    MCP_SERVER_NOT_FOUND = "mcp_server_not_found"
    MCP_CREDENTIALS_GONE = "mcp_credentials_gone"
    MCP_SERVER_UNREACHABLE = "mcp_server_unreachable"
    INTERNAL_ERROR = "internal_error"  # also a run error: a bug of ours
    # the model gateway (answers to a sandbox's model calls)
    BUDGET_EXCEEDED = "budget_exceeded"  # also a turn's stop reason
    MODEL_ERROR = "model_error"  # also a run error: the agent's turn failed on a model error
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_BAD_REQUEST = "upstream_bad_request"
    UPSTREAM_UNAUTHORIZED = "upstream_unauthorized"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_TIMEOUT = "upstream_timeout"

    # ---- run errors: the repository
    CHECKOUT_FAILED = "checkout_failed"
    CLONE_TIMEOUT = "clone_timeout"
    GIT_ERROR = "git_error"
    REF_NOT_FOUND = "ref_not_found"
    COLLECT_FAILED = "collect_failed"
    PATCH_TOO_LARGE = "patch_too_large"
    PLAN_CHANGED_TREE = "plan_changed_tree"
    PUBLISH_FAILED = "publish_failed"
    # the sandbox
    SANDBOX_ERROR = "sandbox_error"
    SANDBOX_GONE = "sandbox_gone"
    SANDBOX_START_FAILED = "sandbox_start_failed"
    DOCKER_UNAVAILABLE = "docker_unavailable"
    IMAGE_MISSING = "image_missing"
    E2B_UNAVAILABLE = "e2b_unavailable"
    NETWORK_UNSAFE = "network_unsafe"
    OUT_OF_MEMORY = "out_of_memory"
    PROCESS_LIMIT = "process_limit"
    WORKSPACE_FULL = "workspace_full"
    SANDBOX_STORAGE_FULL = "sandbox_storage_full"
    # the repository's environment (envs/): setup.sh or start.sh failed or timed out
    SETUP_FAILED = "setup_failed"
    # the agent and its model
    AGENT_ERROR = "agent_error"
    AGENT_UNREACHABLE = "agent_unreachable"
    AGENT_START_TIMEOUT = "agent_start_timeout"
    TURN_TIMEOUT = "turn_timeout"
    MODEL_UNREACHABLE = "model_unreachable"
    # the server
    SERVER_RESTARTED = "server_restarted"
    NOT_READY = "not_ready"  # /readyz: a check failed (503)


class ApiError(Exception):
    status = 400
    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, *, field: str | None = None, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, dict[str, str]]:
        err = {"code": self.code.value, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


class BadRequest(ApiError):
    status = 400
    code = ErrorCode.BAD_REQUEST


class InvalidRequest(ApiError):
    status = 422
    code = ErrorCode.INVALID_REQUEST


class Unsupported(InvalidRequest):
    code = ErrorCode.UNSUPPORTED


class IdempotencyKeyReused(InvalidRequest):
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class ProtectedBranch(InvalidRequest):
    code = ErrorCode.PROTECTED_BRANCH


class NetworkModeNotAllowed(InvalidRequest):
    code = ErrorCode.NETWORK_MODE_NOT_ALLOWED


class NetworkModeNotSupported(InvalidRequest):
    code = ErrorCode.NETWORK_MODE_NOT_SUPPORTED


class McpServersNeedNetwork(InvalidRequest):
    code = ErrorCode.MCP_SERVERS_NEED_NETWORK


class Unauthorized(ApiError):
    status = 401
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ApiError):
    status = 403
    code = ErrorCode.FORBIDDEN


class PaymentRequired(ApiError):
    status = 402
    code = ErrorCode.INSUFFICIENT_CREDITS


class BudgetExceeded(ApiError):
    """The gateway refuses a sandbox's model call (``safety.resources`` or no credits left).
    402 and no retry words in the message: the agent ends the turn at once instead of retrying."""

    status = 402
    code = ErrorCode.BUDGET_EXCEEDED


class NotFound(ApiError):
    status = 404
    code = ErrorCode.NOT_FOUND


class MethodNotAllowed(ApiError):
    status = 405
    code = ErrorCode.METHOD_NOT_ALLOWED


class NotAcceptable(ApiError):
    status = 406
    code = ErrorCode.NOT_ACCEPTABLE


class Conflict(ApiError):
    status = 409
    code = ErrorCode.CONFLICT


class TurnInProgress(Conflict):
    code = ErrorCode.TURN_IN_PROGRESS


class RunTerminal(Conflict):
    code = ErrorCode.RUN_TERMINAL


class SessionExpired(Conflict):
    code = ErrorCode.SESSION_EXPIRED


class PayloadTooLarge(ApiError):
    status = 413
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(ApiError):
    status = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class McpServerUnreachable(ApiError):
    status = 502
    code = ErrorCode.MCP_SERVER_UNREACHABLE


class RequestTimeout(ApiError):
    """The request body did not arrive within ``limits.request_body_timeout_s``."""

    status = 408
    code = ErrorCode.REQUEST_TIMEOUT


class RateLimited(ApiError):
    status = 429
    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class GatewayError(ApiError):
    """A provider's failure as the gateway answers it (status and ``upstream_*`` code already
    mapped by ``gateway/upstream.py``)."""

    status = 502
    code = ErrorCode.UPSTREAM_ERROR

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.UPSTREAM_ERROR, status: int = 502) -> None:
        super().__init__(message, code=code)
        self.status = status


class RunError(Exception):
    """Something that ends a run (or a turn): ``code`` and ``message`` become the run's
    ``error.code`` and ``error.message``. ``str()`` is the message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RunFailure(RunError):
    """A run cannot go on: it fails with ``code``."""


class SandboxError(RunError):
    """A sandbox operation failed; ``code`` becomes a run's ``error.code`` when fatal."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.SANDBOX_ERROR) -> None:
        super().__init__(code, message)


class SandboxGone(SandboxError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.SANDBOX_GONE)


class AgentError(RunError):
    """The agent in the sandbox failed or did not answer (raised by agent harnesses):
    ``agent_error`` (a bad or failed answer), ``agent_unreachable`` (no answer),
    ``agent_start_timeout``, ``turn_timeout``."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.AGENT_ERROR) -> None:
        super().__init__(code, message)


class TurnStop(RunError):
    """A turn ended early (``budget_exceeded``, ``model_unreachable``): the work so far is kept
    and the run goes idle with ``code`` as its ``error.code``, usable for follow-ups.
    ``partial`` is the assistant text of the turn so far (its summary)."""

    def __init__(self, code: ErrorCode, message: str, partial: str = "") -> None:
        super().__init__(code, message)
        self.partial = partial


class BudgetStop(TurnStop):
    """The gateway refused a model call because of ``safety.resources``."""

    def __init__(self, message: str, partial: str) -> None:
        super().__init__(ErrorCode.BUDGET_EXCEEDED, message, partial)
