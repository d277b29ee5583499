"""The engine's load options; pure, no ctransformers.

Options come from ``LoadSpec.options``. ctransformers' own names are the
primary ones; the llama.cpp engine's names for the same settings (``n_ctx``,
``n_threads``, ``n_batch``) are accepted too, so that a catalogue entry does
not depend on which engine ends up reading the file. Any other key fails the
load with its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from cortex.errors import InvalidModelOptions

#: ctransformers 0.2.27's model types (its own spellings), normalised the way
#: it compares them: lower case, only letters and digits.
MODEL_TYPES = (
    "gpt2",
    "gptj",
    "gpt_neox",
    "dolly-v2",
    "mpt",
    "falcon",
    "starcoder",
    "gpt_bigcode",
    "replit",
    "llama",
)
LIBS = ("avx2", "avx", "basic")


def normalise_model_type(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


_NORMALISED = {normalise_model_type(t): t for t in MODEL_TYPES}


def _int(minimum: int):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value

    return check


def _one(value: Any) -> int:
    if value != 1 or isinstance(value, bool):
        raise ValueError("ctransformers runs one sequence at a time: expected 1")
    return 1


def _model_type(value: Any) -> str:
    if isinstance(value, str) and normalise_model_type(value) in _NORMALISED:
        return _NORMALISED[normalise_model_type(value)]
    raise ValueError(f"expected one of {', '.join(MODEL_TYPES)}")


def _lib(value: Any) -> str:
    # Only the bundled builds: a path would load arbitrary code.
    if value not in LIBS:
        raise ValueError(f"expected one of {', '.join(LIBS)}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


# key -> (attribute, check)
_OPTIONS = {
    "model_type": ("model_type", _model_type),
    "context_length": ("context_length", _int(1)),
    "n_ctx": ("context_length", _int(1)),
    "n_ctx_max": ("n_ctx_max", _int(1)),
    "threads": ("threads", _int(1)),
    "n_threads": ("threads", _int(1)),
    "batch_size": ("batch_size", _int(1)),
    "n_batch": ("batch_size", _int(1)),
    "last_n_tokens": ("last_n_tokens", _int(1)),
    "parallel": ("parallel", _one),
    "lib": ("lib", _lib),
    "chat_format": ("chat_format", _str),
}


@attrs.frozen(kw_only=True)
class LoadOptions:
    """Settings for one load.

    Attributes:
      model_type: the architecture (GGML files do not record it), or None to
        decide from the file.
      context_length: the context to load with, or None for the file's
        (capped by n_ctx_max where the architecture allows a different one).
      n_ctx_max: the cap on a context length taken from the file.
      threads: CPU threads; 1 is fastest for small models on few cores.
      batch_size: tokens evaluated per step of prompt processing.
      last_n_tokens: how far back the repetition penalty looks.
      lib: which bundled build of ctransformers to use; None detects once.
      chat_format: one of ``cortex_ctransformers.chat.FORMATS``.
      parallel: sequences generated at once; only 1 (accepted so that a
        catalogue entry written for llama.cpp's engine still loads).
    """

    model_type: str | None = None
    context_length: int | None = None
    n_ctx_max: int = 32768
    threads: int = 1
    batch_size: int = 8
    last_n_tokens: int = 64
    lib: str | None = None
    chat_format: str | None = None
    parallel: int = 1

    @classmethod
    def from_spec(
        cls, model_id: str, options: Mapping[str, Any], chat_format: str | None
    ) -> LoadOptions:
        """Check ``options``; ``chat_format`` (the LoadSpec field) wins over the option.

        Raises:
          InvalidModelOptions: an unknown key, a value of the wrong type, or two
            spellings of one setting.
        """
        values: dict[str, Any] = {}
        for key, value in options.items():
            known = _OPTIONS.get(key)
            if known is None:
                raise InvalidModelOptions(
                    f"model {model_id!r}: unknown ctransformers option {key!r} "
                    f"(known: {', '.join(sorted(_OPTIONS))})"
                )
            attribute, check = known
            if attribute in values:
                raise InvalidModelOptions(
                    f"model {model_id!r}: ctransformers option {key!r} is set twice "
                    f"(under another name too)"
                )
            try:
                values[attribute] = check(value)
            except (TypeError, ValueError) as exc:
                raise InvalidModelOptions(
                    f"model {model_id!r}: ctransformers option {key!r}: {exc}"
                )
        if chat_format is not None:
            values["chat_format"] = chat_format
        return cls(**values)
