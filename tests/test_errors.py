"""The exception tree: drawn whole in its docstring, and its one reverse map."""

from __future__ import annotations

import inspect
import json

import pytest

from cortex import errors
from cortex.errors import CortexError, error_for_status
from cortex.gateway.upstream import error_from_response
from cortex.wire import envelope

CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, CortexError) and cls.__module__ == errors.__name__
]


def test_every_class_is_drawn_in_the_tree() -> None:
    drawn = [line.strip(" │├└─").split(" ")[0] for line in (errors.__doc__ or "").splitlines()]
    for cls in CLASSES:
        assert cls.__name__ in drawn, cls.__name__


@pytest.mark.parametrize(
    "cls", [c for c in CLASSES if c.code is not None], ids=lambda c: c.__name__
)
def test_a_code_comes_back_as_the_class_that_owns_it(cls: type[CortexError]) -> None:
    exc = error_for_status(cls.status, "m", code=cls.code)
    assert type(exc) is cls and exc.status == cls.status and exc.code == cls.code


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.InvalidRequest),
        (401, errors.Unauthorized),
        (403, errors.PermissionDenied),
        (404, errors.NotFound),
        (405, errors.MethodNotAllowed),
        (413, errors.PayloadTooLarge),
        (429, errors.QueueFull),
        (502, errors.UpstreamError),
        (503, errors.Unavailable),
        (504, errors.UpstreamTimeout),
        (409, errors.RequestError),
        (500, errors.ServiceError),
        (501, errors.ServiceError),
    ],
)
def test_a_status_comes_back_as_its_class(status: int, cls: type[CortexError]) -> None:
    exc = error_for_status(status, "m", param="p")
    assert type(exc) is cls and exc.status == status and exc.param == "p"
    # Only a status no class owns is carried by the instance.
    assert ("status" in vars(exc)) == (cls.status != status)


def test_a_code_under_another_status_keeps_the_status() -> None:
    exc = error_for_status(500, "m", code="context_length_exceeded")
    assert type(exc) is errors.ServiceError
    assert exc.status == 500 and exc.code == "context_length_exceeded"


def test_a_too_long_prompt_is_worded_by_each_dialect() -> None:
    sent = errors.ContextOverflow.of(18031, 8192, param="messages")
    # Back from the neuron's answer, the figures are read from its message.
    back = error_for_status(400, sent.message, code="context_length_exceeded", param="messages")
    assert isinstance(back, errors.ContextOverflow)
    for exc in (sent, back):
        _, body, _ = envelope.error_parts(exc)
        assert json.loads(body)["error"] == {
            "message": "This model's maximum context length is 8192 tokens. However, your "
            "messages resulted in 18031 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
        _, body, _ = envelope.error_parts(exc, dialect=envelope.ANTHROPIC)
        assert json.loads(body)["error"] == {
            "type": "invalid_request_error",
            "message": "prompt is too long: 18031 tokens > 8192 maximum",
        }


def test_retry_after_is_the_class_default_unless_given() -> None:
    assert errors.QueueFull("x").retry_after == 1
    assert errors.Unavailable("x").retry_after == 5
    assert errors.Unavailable("x", retry_after=9).retry_after == 9
    assert errors.InvalidRequest("x").retry_after is None
    assert errors.NoHarness("x").retry_after is None
    assert error_for_status(503, "x").retry_after == 5
    assert error_for_status(429, "x", retry_after=7).retry_after == 7
    _, _, headers = envelope.error_parts(errors.QueueFull("x", retry_after=3))
    assert ("retry-after", "3") in headers
    _, _, headers = envelope.error_parts(errors.InvalidRequest("x"))
    assert not [name for name, _ in headers if name == "retry-after"]


@pytest.mark.parametrize(
    ("status", "body", "headers", "cls", "expected"),
    [
        (429, b"{}", {"retry-after": "4"}, errors.QueueFull, 429),
        (503, b"{}", {"retry-after": "junk"}, errors.Unavailable, 503),
        (404, b'{"error": {"code": "model_not_found"}}', {}, errors.ModelNotFound, 404),
        (401, b"{}", {}, errors.UpstreamError, 502),
        (500, b"{}", {}, errors.UpstreamError, 502),
        (504, b"{}", {}, errors.UpstreamTimeout, 504),
        (422, b'{"error": {"code": "invalid_model_file"}}', {}, errors.InvalidModelFile, 422),
        (418, b"not json", {}, errors.RequestError, 418),
    ],
)
def test_a_neurons_error_answer(
    status: int, body: bytes, headers: dict[str, str], cls: type[CortexError], expected: int
) -> None:
    exc = error_from_response(status, body, headers)
    assert type(exc) is cls and exc.status == expected
    if cls is errors.QueueFull:
        assert exc.retry_after == 4
    if cls is errors.Unavailable:
        assert exc.retry_after == 5
