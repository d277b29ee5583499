"""Plugin authoring: docs/plugins.md's example engine, installed and served.

The example engine is taken from the page itself, so the page stays true: it
is installed as ``throwaway_engine`` through a ``cortex.harness`` entry point
(a dist-info directory on sys.path, which is all importlib.metadata needs)
and serves requests through a real neuron.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from cortex.harness import harness_infos, plugin_manager
from tests.neuron_helpers import running_neuron

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
ENGINE_NAME_LINE = 'NAME = "echo"'


def python_block(marker: str) -> str:
    """The ```python block of docs/plugins.md that contains ``marker``."""
    blocks = re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(), flags=re.S | re.M)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"docs/plugins.md: expected one python block with {marker!r}"
    return found[0]


def echo_model_file(directory: Path) -> Path:
    path = directory / "hello.echo"
    path.write_bytes(b"ECHO")
    return path


@pytest.fixture
def throwaway_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The docs' engine, renamed "throwaway", installed through an entry point."""
    site = tmp_path / "site"
    site.mkdir()
    source = python_block("# cortex_echo.py")
    assert ENGINE_NAME_LINE in source
    engine = source.replace(ENGINE_NAME_LINE, 'NAME = "throwaway"')
    (site / "throwaway_engine.py").write_text(engine)
    dist_info = site / "throwaway_engine-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: throwaway-engine\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text("[cortex.harness]\nthrowaway = throwaway_engine\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.modules.pop("throwaway_engine", None)
        importlib.invalidate_caches()


def test_entry_point_registers_the_engine(throwaway_installed: None) -> None:
    pm = plugin_manager()
    assert pm.get_plugin("throwaway") is sys.modules["throwaway_engine"]
    assert "throwaway" in [info.name for info in harness_infos(pm)]


def test_blocked_harnesses_blocks_the_entry_point(throwaway_installed: None) -> None:
    pm = plugin_manager(blocked=["throwaway"])
    assert pm.is_blocked("throwaway")
    assert pm.get_plugin("throwaway") is None
    assert "throwaway" not in [info.name for info in harness_infos(pm)]


async def test_entry_point_engine_serves_requests(
    throwaway_installed: None, tmp_path: Path
) -> None:
    model = echo_model_file(tmp_path)
    with trio.fail_after(30):
        # No harness named: the engine that can read the file loads it.
        async with running_neuron([("hello", str(model))], options={}) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=10) as http:
                discovery = (await http.get("/discovery")).json()
                assert "throwaway" in [h["name"] for h in discovery["harnesses"]]

                body = {"model": "hello", "prompt": "Hello, plugin", "max_tokens": 64}
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                choice = response.json()["choices"][0]
                assert (choice["text"], choice["finish_reason"]) == ("Hello, plugin", "stop")

                # Token limits and template stops are the neuron's job, not the engine's.
                body["max_tokens"] = 5
                choice = (await http.post("/v1/completions", json=body)).json()["choices"][0]
                assert (choice["text"], choice["finish_reason"]) == ("Hello", "length")
                chat = {"model": "hello", "messages": [{"role": "user", "content": "Hi"}]}
                response = await http.post("/v1/chat/completions", json=chat)
                assert response.status_code == 200, response.text
                choice = response.json()["choices"][0]
                assert choice["message"]["content"] == "<|user|>Hi"
                assert choice["finish_reason"] == "stop"


async def test_blocked_engine_cannot_load(throwaway_installed: None, tmp_path: Path) -> None:
    model = echo_model_file(tmp_path)
    with trio.fail_after(30):
        async with running_neuron(blocked_harnesses=["throwaway"]) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=10) as http:
                discovery = (await http.get("/discovery")).json()
                assert "throwaway" not in [h["name"] for h in discovery["harnesses"]]
                load = {"model_id": "hello", "source": str(model), "harness": "throwaway"}
                response = await http.post("/models/load", json=load)
                assert response.status_code == 503, response.text
                assert "throwaway" in response.json()["error"]["message"]


@pytest.fixture
def cortex_echo_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The docs' engine as a plain module named cortex_echo (no entry point)."""
    site = tmp_path / "echo-site"
    site.mkdir()
    (site / "cortex_echo.py").write_text(python_block("# cortex_echo.py"))
    monkeypatch.syspath_prepend(str(site))
    try:
        yield
    finally:
        sys.modules.pop("cortex_echo", None)


def docs_test(marker: str, name: str) -> object:
    namespace: dict[str, object] = {}
    exec(compile(python_block(marker), str(DOCS), "exec"), namespace)
    return namespace[name]


def test_docs_hookspec_example(cortex_echo_importable: None, tmp_path: Path) -> None:
    test = docs_test("def test_loads_echo_files", "test_loads_echo_files")
    test(tmp_path)  # type: ignore[operator]


async def test_docs_neuron_example(cortex_echo_importable: None, tmp_path: Path) -> None:
    test = docs_test("async def test_echo_engine_serves", "test_echo_engine_serves")
    await test(tmp_path)  # type: ignore[operator]
