"""The one exception tree of cortex.

Every error cortex raises on purpose is a ``CortexError``. Errors that reach
an HTTP client carry the status code they map to; each dialect turns them
into its own envelope in exactly one place (``cortex.wire.openai.error_body``
and ``cortex.wire.anthropic.error_body``).

    CortexError
    ├── ConfigError               a config file, key or environment value is wrong
    ├── RequestError              the client's fault (4xx)
    │   ├── InvalidRequest        400: the body is not a valid request
    │   ├── Unauthorized          401: missing or wrong key or token
    │   ├── PermissionDenied      403: not allowed here
    │   ├── ModelNotFound         404: no such model, nowhere can serve it
    │   ├── PayloadTooLarge       413: the body is over the size limit
    │   └── QueueFull             429: the model's queue is full (Retry-After)
    ├── ServiceError              our side or a dependency (5xx)
    │   ├── Unavailable           503: known, but nobody can serve it now (Retry-After)
    │   ├── UpstreamError         502: a neuron failed or answered badly
    │   │   └── NeuronUnreachable 502: no connection to it, or the connection dropped
    │   └── UpstreamTimeout       504: a neuron did not answer in time
    └── HarnessError              an engine could not do what was asked
        ├── NoHarness             503: the engine a load names is not installed here
        ├── ModelLoadError        500: a load failed (no memory, the engine failed)
        │   ├── InvalidModelFile        422: the file is damaged (truncated, bad header)
        │   ├── UnsupportedModelFormat  422: no installed engine reads files of its kind
        │   └── InvalidModelOptions     400: an engine option or chat_format it does not take
        ├── ChatTemplateMissing   400: the model has no chat template or format
        └── ContextOverflow       400: the prompt does not fit the context

A model file is the caller's: a damaged or foreign one is a 4xx with a
``code`` that says which, never a 5xx that reads as the neuron's fault.
"""

from __future__ import annotations


class CortexError(Exception):
    """Base of every error cortex raises on purpose."""

    status: int = 500
    #: The OpenAI ``error.type``; the Anthropic type is derived from ``status``.
    kind: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(CortexError):
    """A configuration file, key or environment override is invalid."""


class RequestError(CortexError):
    status = 400
    kind = "invalid_request_error"


class InvalidRequest(RequestError):
    status = 400


class Unauthorized(RequestError):
    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(RequestError):
    status = 403
    kind = "permission_error"


class ModelNotFound(RequestError):
    status = 404
    kind = "not_found_error"
    code = "model_not_found"


class PayloadTooLarge(RequestError):
    status = 413
    kind = "request_too_large"


class QueueFull(RequestError):
    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServiceError(CortexError):
    status = 500
    kind = "server_error"


class Unavailable(ServiceError):
    status = 503
    kind = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(ServiceError):
    status = 502
    kind = "upstream_error"


class NeuronUnreachable(UpstreamError):
    """The neuron could not be reached: it is down, not the request that failed.

    The gateway routes around it (suspect until a poll reaches it again);
    the client sees this only when a request has nowhere else to go.
    """


class UpstreamTimeout(ServiceError):
    status = 504
    kind = "upstream_timeout"


class HarnessError(CortexError):
    status = 500
    kind = "server_error"


class NoHarness(HarnessError):
    status = 503
    kind = "service_unavailable"


class ModelLoadError(HarnessError):
    status = 500


class InvalidModelFile(ModelLoadError):
    """The file is of a format an engine reads, but damaged: truncated, a bad header."""

    status = 422
    kind = "invalid_request_error"
    code = "invalid_model_file"


class UnsupportedModelFormat(ModelLoadError):
    """No installed engine reads files of this kind (or the one named does not)."""

    status = 422
    kind = "invalid_request_error"
    code = "unsupported_model_format"


class InvalidModelOptions(ModelLoadError):
    """A load's engine options (or chat_format) are unknown, mistyped or out of range."""

    status = 400
    kind = "invalid_request_error"
    code = "invalid_model_options"

    def __init__(self, message: str, *, param: str | None = "options") -> None:
        super().__init__(message, param=param)


class ChatTemplateMissing(HarnessError):
    status = 400
    kind = "invalid_request_error"
    code = "chat_template_missing"


class ContextOverflow(HarnessError):
    status = 400
    kind = "invalid_request_error"
    code = "context_length_exceeded"
