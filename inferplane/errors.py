"""Errors every layer raises; protocols map them to HTTP statuses and gRPC codes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


def retry_after(seconds: float) -> tuple[bytes, bytes]:
    """The Retry-After header: whole seconds (RFC 9110 10.2.3), rounded up so that a client
    never retries early."""
    return (b"retry-after", str(max(1, int(-(-seconds // 1)))).encode())


class InferplaneError(Exception):
    """Base class: carries the HTTP status the protocols answer with."""

    status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the HTTP answer carries besides the body (WWW-Authenticate, Retry-After)."""
        return []


class BadRequest(InferplaneError):
    status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotFound(InferplaneError):
    status = 404
    grpc_code = "NOT_FOUND"


class Unauthenticated(InferplaneError):
    """No credentials, or credentials that do not verify (unknown key, bad or expired token)."""

    status = 401
    grpc_code = "UNAUTHENTICATED"

    def __init__(self, message: str, challenge: str = 'Bearer realm="inferplane"') -> None:
        super().__init__(message)
        self.challenge = challenge

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", self.challenge.encode("latin-1"))]


class Forbidden(InferplaneError):
    """The caller is known but lacks the scope for this endpoint or target."""

    status = 403
    grpc_code = "PERMISSION_DENIED"


class TooManyRequests(InferplaneError):
    """A tenant's quota or rate limit refused this request; `retry_after_s` says when to retry."""

    status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [retry_after(self.retry_after_s)]


class PayloadTooLarge(InferplaneError):
    status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(InferplaneError):
    """Model loading, not ready, or the server is overloaded; `retry_after_s`, when known, says
    when trying again can help (a failed load's back-off)."""

    status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.retry_after_s is None else [retry_after(self.retry_after_s)]


class CataloguePending(Unavailable):
    """The model is listed but its model.yaml is not read yet (an on-demand server's first
    seconds). Front ends `await wait()` (which reads it) and try once more instead of failing."""

    def __init__(self, name: str, wait: Callable[[], Awaitable[None]]) -> None:
        super().__init__(f"model '{name}': its model.yaml is still being read; retry", 1.0)
        self.name = name
        self.wait = wait


class Overloaded(Unavailable):
    """The model's queue is full: answered at once instead of growing a backlog."""

    grpc_code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(InferplaneError):
    status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class InternalError(InferplaneError):
    status = 500
    grpc_code = "INTERNAL"


class RepositoryError(InferplaneError):
    """A repository or model.yaml problem (bad layout, missing file, checksum mismatch)."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"


class VersionTaken(RepositoryError):
    """Another registration holds (or finished) this version number."""


class IntegrityError(RepositoryError):
    """An artifact's sha256 does not match what model.yaml recorded."""


class MissingExtra(InferplaneError):
    """An optional framework is not installed; the message names the extra to install."""

    status = 501
    grpc_code = "UNIMPLEMENTED"

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"the '{module}' package is not installed; install it with "
            f"pip install 'inferplane[{extra}]'"
        )
        self.extra = extra
