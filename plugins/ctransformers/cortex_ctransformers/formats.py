"""Reading model file headers in Python, before ctransformers sees the file.

ctransformers 0.2.27 trusts its input: a GGUF it cannot read (a gpt2-BPE
tokenizer, say) crashes the process instead of failing the load, and a GGML
file loaded as the wrong architecture can abort inside ggml. So every file
is checked here first, with plain reads; nothing here imports ctransformers.

GGML-era files (before GGUF) start with a little-endian uint32 magic and do
not record their architecture; GGUF files carry it in their metadata.
"""

from __future__ import annotations

import pathlib
import struct
from typing import BinaryIO

import attrs

GGUF_MAGIC = b"GGUF"

#: The on-disk bytes of the GGML-era magics (uint32 little-endian), and the
#: architecture to assume when the load names none.
GGML_MAGICS: dict[bytes, tuple[str, str | None]] = {
    b"lmgg": ("ggml", None),  # ggml's examples: gpt2, gpt-j, gpt-neox, mpt, starcoder...
    b"fmgg": ("ggmf", "llama"),  # llama.cpp's versioned formats
    b"tjgg": ("ggjt", "llama"),
    b"ccgg": ("ggcc", "falcon"),  # ggllm.cpp's falcon
}

# ggml tensor types the llama.cpp inside ctransformers 0.2.27 (GGUF as of
# autumn 2023) knows: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K.
# Later types (IQ*, BF16, ...) would be read as garbage.
GGUF_TENSOR_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14})

# GGUF metadata value types: fixed sizes, then string (8) and array (9).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q"}
_GGUF_SCALAR |= {11: "q", 12: "d"}


class FormatError(Exception):
    """The file is not what its magic says, or is cut short."""


def sniff(path: pathlib.Path) -> str | None:
    """The container format by magic: "gguf", "ggml", "ggmf", "ggjt", "ggcc" or None.

    Raises:
      OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return "gguf"
    known = GGML_MAGICS.get(magic)
    return known[0] if known else None


def default_model_type(container: str) -> str | None:
    for name, model_type in GGML_MAGICS.values():
        if name == container:
            return model_type
    return None


@attrs.frozen
class Gpt2Hparams:
    """The hyperparameters of a ggml ``examples/gpt-2`` layout file (gpt2, starcoder)."""

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int
    ftype: int


def read_gpt2_hparams(path: pathlib.Path) -> Gpt2Hparams | None:
    """The header of a GGML file in the gpt2 layout, or None if it is not one.

    The layout is the magic, six int32 (n_vocab, n_ctx, n_embd, n_head,
    n_layer, ftype) and the vocabulary's size again. gpt-j, gpt-neox and mpt
    headers have more or other fields, so the repeated n_vocab and sane
    dimensions tell the layout apart (starcoder shares it).
    """
    with path.open("rb") as f:
        data = f.read(4 + 7 * 4)
    if len(data) < 32 or data[:4] != b"lmgg":
        return None
    n_vocab, n_ctx, n_embd, n_head, n_layer, ftype, n_vocab_again = struct.unpack("<7i", data[4:])
    sane = (
        0 < n_vocab == n_vocab_again
        and 0 < n_ctx <= 1 << 20
        and 0 < n_head <= n_embd <= 1 << 16
        and n_embd % n_head == 0
        and 0 < n_layer <= 1024
        and 0 <= ftype % 1000 <= 20
    )
    if not sane:
        return None
    return Gpt2Hparams(n_vocab, n_ctx, n_embd, n_head, n_layer, ftype)


@attrs.frozen
class GgufInfo:
    """What the engine needs from a GGUF file's metadata and tensor table."""

    version: int
    architecture: str | None
    tokenizer: str | None
    #: Scalar metadata values (arrays are skipped).
    metadata: dict[str, object]
    tensor_types: frozenset[int]

    def hparam(self, key: str) -> int | None:
        value = self.metadata.get(f"{self.architecture}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError("the file ends inside its header")
    return data


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read(f, 4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _string(f: BinaryIO) -> bytes:
    n = _u64(f)
    if n > 1 << 24:
        raise FormatError("a metadata string is implausibly long")
    return _read(f, n)


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == 8:
        f.seek(_u64(f), 1)
    elif kind == 9:
        item_kind, count = _u32(f), _u64(f)
        if item_kind in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item_kind] * count, 1)
        elif item_kind == 8:
            for _ in range(count):
                f.seek(_u64(f), 1)
        else:
            raise FormatError(f"unsupported metadata array type {item_kind}")
    elif kind in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[kind], 1)
    else:
        raise FormatError(f"unknown metadata type {kind}")


def read_gguf(path: pathlib.Path) -> GgufInfo:
    """Walk a GGUF (v2 or v3) header: metadata scalars and the tensor types.

    Arrays (the vocabulary) are skipped with seeks, so this reads a few KB
    even for large models.

    Raises:
      FormatError: not GGUF v2/v3, or a header that is cut short or malformed.
      OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        if _read(f, 4) != GGUF_MAGIC:
            raise FormatError("not a GGUF file")
        version = _u32(f)
        if version not in (2, 3):
            raise FormatError(f"GGUF version {version} (ctransformers reads 2 and 3)")
        n_tensors, n_kv = _u64(f), _u64(f)
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise FormatError("implausible tensor or metadata counts")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = _string(f).decode("utf-8", errors="replace")
            kind = _u32(f)
            if kind == 8:
                metadata[key] = _string(f).decode("utf-8", errors="replace")
            elif kind in _GGUF_SCALAR:
                size = _GGUF_SIZES[kind]
                metadata[key] = struct.unpack("<" + _GGUF_SCALAR[kind], _read(f, size))[0]
            else:
                _skip_value(f, kind)
        types = set()
        for _ in range(n_tensors):
            _string(f)  # name
            n_dims = _u32(f)
            if n_dims > 4:
                raise FormatError("a tensor has more than 4 dimensions")
            f.seek(8 * n_dims, 1)
            types.add(_u32(f))
            f.seek(8, 1)  # offset
    architecture = metadata.get("general.architecture")
    tokenizer = metadata.get("tokenizer.ggml.model")
    return GgufInfo(
        version=version,
        architecture=architecture if isinstance(architecture, str) else None,
        tokenizer=tokenizer if isinstance(tokenizer, str) else None,
        metadata=metadata,
        tensor_types=frozenset(types),
    )
