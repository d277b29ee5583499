"""The one exception tree of cortex.

Every error cortex raises on purpose is a ``CortexError``. Errors that reach
an HTTP client carry the status code they map to (and Retry-After, where
waiting helps); each dialect turns them into its own envelope in exactly one
place (``cortex.wire.openai.error_body`` and ``cortex.wire.anthropic.error_body``),
and ``cortex.wire.envelope`` makes the whole answer, for both roles.

    CortexError
    ├── ConfigError               a config file, key or environment value is wrong
    ├── RequestError              the client's fault (4xx)
    │   ├── InvalidRequest        400: the body is not a valid request
    │   │   └── ThreadUnsupported 400: an Anthropic message thread, which cortex does not keep
    │   ├── Unauthorized          401: missing or wrong key or token
    │   ├── PermissionDenied      403: not allowed here
    │   ├── NotFound              404: no such route
    │   │   └── ModelNotFound     404: no such model, nowhere can serve it
    │   ├── MethodNotAllowed      405: the route takes other methods
    │   ├── PayloadTooLarge       413: the body is over the size limit
    │   ├── UnsupportedMediaType  415: the body's Content-Encoding is not one cortex decodes
    │   └── QueueFull             429: the model's queue is full (Retry-After)
    ├── ServiceError              our side or a dependency (5xx)
    │   ├── Unavailable           503: known, but nobody can serve it now (Retry-After)
    │   ├── InvalidCatalogueEntry 500: a load failed because its catalogue entry is wrong
    │   ├── InvalidCatalogue      500: a reload found models.toml bad and kept the old one
    │   ├── UpstreamError         502: a neuron failed or answered badly
    │   │   └── NeuronUnreachable 502: no connection to it, or the connection dropped
    │   └── UpstreamTimeout       504: a neuron did not answer in time
    └── HarnessError              an engine could not do what was asked
        ├── NoHarness             503: the engine a load names is not installed here
        ├── ModelLoadError        500: a load failed (no memory, the engine failed)
        │   ├── InsufficientMemory      503: not enough free memory for it now (needs N MiB)
        │   ├── InvalidModelFile        422: the file is damaged (truncated, bad header)
        │   ├── UnsupportedModelFormat  422: no installed engine reads files of its kind
        │   └── InvalidModelOptions     400: an engine option or chat_format it does not take
        ├── GenerationFailed      500: the engine failed while generating
        ├── ChatTemplateMissing   400: the model has no chat template or format
        └── ContextOverflow       400: the prompt does not fit the context

The way back, from an HTTP error answer to the error it stands for (a
neuron's answer to the gateway, a route the web framework refused), is
:func:`error_for_status`: the one reverse map.

A model file is the caller's: a damaged or foreign one is a 4xx with a
``code`` that says which, never a 5xx that reads as the neuron's fault.
"""

from __future__ import annotations

import re


class CortexError(Exception):
    """Base of every error cortex raises on purpose.

    Args:
      message: what went wrong, for the client.
      param: the request field at fault, if one is.
      retry_after: seconds after which trying again may succeed (the
        Retry-After header); None: the class's default, if it has one.
    """

    status: int = 500
    #: The OpenAI ``error.type``. As OpenAI's API sets it: ``invalid_request_error``
    #: for a 400, 401 and 404 (``code`` says which: ``invalid_api_key``,
    #: ``model_not_found``), ``server_error`` for every 5xx. The Anthropic type
    #: is derived from ``status``.
    kind: str = "server_error"
    code: str | None = None
    #: Seconds to wait before trying again (Retry-After); None: no header.
    retry_after: int | None = None

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after is not None:
            self.retry_after = retry_after


class ConfigError(CortexError):
    """A configuration file, key or environment override is invalid."""


class RequestError(CortexError):
    status = 400
    kind = "invalid_request_error"


class InvalidRequest(RequestError):
    status = 400


class ThreadUnsupported(InvalidRequest):
    """An Anthropic ``thread`` (the message-threads beta): the server keeps no conversation.

    The Anthropic dialect puts ``code`` in ``error.details.error_code``,
    where the SDKs' tool runners look for it: on this one they send the
    turn again, and every later one, with the whole history and no thread.
    """

    code = "thread_unsupported_request"


class Unauthorized(RequestError):
    status = 401
    code = "invalid_api_key"


class PermissionDenied(RequestError):
    status = 403
    kind = "permission_error"


class NotFound(RequestError):
    status = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(RequestError):
    status = 405


class PayloadTooLarge(RequestError):
    status = 413
    kind = "request_too_large"


class UnsupportedMediaType(RequestError):
    status = 415


class QueueFull(RequestError):
    status = 429
    kind = "rate_limit_error"
    retry_after = 1


class ServiceError(CortexError):
    status = 500
    kind = "server_error"


class Unavailable(ServiceError):
    status = 503
    retry_after = 5


class InvalidCatalogueEntry(ServiceError):
    """The gateway's catalogue entry for a model is wrong: a neuron refused to load it so.

    The operator's fault, never the client's (who sent no options).
    """

    code = "invalid_catalogue_entry"


class InvalidCatalogue(ServiceError):
    """A reload (``POST /admin/reload``) found the gateway's models.toml bad.

    The server's file is at fault, not the request: the old catalogue stays.
    """

    code = "invalid_catalogue"


class UpstreamError(ServiceError):
    status = 502


class NeuronUnreachable(UpstreamError):
    """The neuron could not be reached: it is down, not the request that failed.

    The gateway routes around it (suspect until a poll reaches it again);
    the client sees this only when a request has nowhere else to go.
    """


class UpstreamTimeout(ServiceError):
    status = 504


class HarnessError(CortexError):
    status = 500
    kind = "server_error"


class NoHarness(HarnessError):
    status = 503


class ModelLoadError(HarnessError):
    status = 500


class InsufficientMemory(ModelLoadError):
    """Not enough memory is free for the model now; it may fit once others are unloaded.

    The message says ``needs at least N MiB`` (``need_mb``): a gateway plans
    its evictions with that figure and tries again.
    """

    status = 503
    code = "insufficient_memory"

    def __init__(self, message: str, *, need_mb: int | None = None) -> None:
        super().__init__(message)
        if need_mb is None:
            # Back from an answer: the figure is in the message, where the neuron put it.
            found = _NEEDS.search(message)
            need_mb = int(found.group(1)) if found else None
        #: MiB the model needs at least; None: not said.
        self.need_mb = need_mb


_NEEDS = re.compile(r"needs at least (\d+) MiB")


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


class GenerationFailed(HarnessError):
    """The engine failed while generating."""


class ChatTemplateMissing(HarnessError):
    status = 400
    kind = "invalid_request_error"
    code = "chat_template_missing"


class ContextOverflow(HarnessError):
    """The prompt leaves no room in the model's context.

    The message is OpenAI's wording (``This model's maximum context length
    is M tokens. However, your messages resulted in N tokens. ...``), which
    LiteLLM and so aider recognise; the Anthropic dialect words it
    Anthropic's way from ``prompt_tokens`` and ``n_ctx`` (Claude Code
    recognises ``prompt is too long: N tokens > M maximum``).
    """

    status = 400
    kind = "invalid_request_error"
    code = "context_length_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        prompt_tokens: int | None = None,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(message, param=param)
        if prompt_tokens is None or n_ctx is None:
            # Back from an answer: the figures are in the message, where the neuron put them.
            found = _OVERFLOW.search(message)
            if found:
                n_ctx, prompt_tokens = int(found.group(1)), int(found.group(2))
        #: The prompt's length and the context's, in tokens; None: not said.
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx

    @classmethod
    def of(cls, prompt_tokens: int, n_ctx: int, *, param: str | None = None) -> ContextOverflow:
        """The error for a prompt of ``prompt_tokens`` in a context of ``n_ctx``, in OpenAI's words.

        Args:
          param: the request field that holds the prompt (``messages``,
            ``prompt``, ``input``); it is named in the message too.
        """
        field = param or "prompt"
        return cls(
            f"This model's maximum context length is {n_ctx} tokens. However, your {field} "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the {field}.",
            param=param,
            prompt_tokens=prompt_tokens,
            n_ctx=n_ctx,
        )


_OVERFLOW = re.compile(
    r"maximum context length is (\d+) tokens\. However, your \w+ resulted in (\d+) tokens"
)


#: The class an error answer's status stands for, where one class owns it.
_BY_STATUS: dict[int, type[CortexError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: QueueFull,
    502: UpstreamError,
    503: Unavailable,
    504: UpstreamTimeout,
}


def _with_codes(cls: type[CortexError]) -> dict[str, type[CortexError]]:
    found = {cls.code: cls} if cls.code is not None else {}
    for sub in cls.__subclasses__():
        found.update(_with_codes(sub))
    return found


#: The class that owns each ``code``: a finer answer than the status alone.
_BY_CODE = _with_codes(CortexError)


def error_for_status(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    retry_after: int | None = None,
) -> CortexError:
    """The error an HTTP error answer stands for: the reverse of ``status``.

    The class that owns ``code`` when its status is ``status`` (a neuron's
    400 ``context_length_exceeded`` comes back a ``ContextOverflow``); else
    the class drawn for ``status``; else the family's base (``RequestError``
    for a 4xx, ``ServiceError`` for the rest) answering ``status`` itself.
    ``code`` is kept either way, so the answer renders as it came.

    Args:
      status: the answer's HTTP status (400 or more).
      message, param: its envelope's message and param.
      code: its envelope's code, if any.
      retry_after: its Retry-After; None: the class's default.
    """
    cls = _BY_CODE.get(code) if code is not None else None
    if cls is None or cls.status != status:
        cls = _BY_STATUS.get(status) or (RequestError if 400 <= status < 500 else ServiceError)
    exc = cls(message)
    exc.param = param
    if retry_after is not None:
        exc.retry_after = retry_after
    if code is not None:
        exc.code = code
    if exc.status != status:
        exc.status = status  # a status no class of the tree owns
    return exc


#: Characters of an error's message that its log line keeps: enough for the
#: field and what is wrong, not a whole echoed prompt.
LOGGED_MESSAGE_CHARS = 300


def log_summary(exc: CortexError) -> str:
    """``exc`` for the log line of the answer it made: its code (or type) and message."""
    return summary_line(exc.code or exc.kind, exc.message)


def summary_line(kind: str, message: str) -> str:
    """``kind: message`` for a log line, the message on one line cut at ``LOGGED_MESSAGE_CHARS``."""
    message = " ".join(message.split())
    if len(message) > LOGGED_MESSAGE_CHARS:
        message = message[: LOGGED_MESSAGE_CHARS - 3] + "..."
    return f"{kind}: {message}"
