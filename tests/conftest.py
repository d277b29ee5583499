from __future__ import annotations

import pathlib
from collections.abc import Callable

import httpx
import openai
import pytest

from cortex.errors import ModelNotFound
from cortex.harness import LoadSpec, Placement, plugin_manager
from cortex.neuron import sources
from tests.fixtures.tinymodel import NO_SYSTEM_NO_TOOLS_TEMPLATE, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny llama GGUF with an embedded ChatML template (n_ctx_train 512)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def no_template_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny llama GGUF without ``tokenizer.chat_template``."""
    path = tmp_path_factory.mktemp("models") / "tiny-no-template.gguf"
    return write_tiny_model(path, name="tiny-no-template", seed=1, chat_template=None)


@pytest.fixture(scope="session")
def no_system_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny llama GGUF whose Gemma-style template raises on system and ignores tools."""
    path = tmp_path_factory.mktemp("models") / "tiny-no-system.gguf"
    return write_tiny_model(
        path, name="tiny-no-system", seed=2, chat_template=NO_SYSTEM_NO_TOOLS_TEMPLATE
    )


@pytest.fixture
def tiny_model_factory(tmp_path: pathlib.Path) -> Callable[..., pathlib.Path]:
    """``factory(filename="tiny.gguf", **write_tiny_model_kwargs) -> path`` in a tmp dir."""

    def factory(filename: str = "tiny.gguf", **kwargs) -> pathlib.Path:
        return write_tiny_model(tmp_path / filename, **kwargs)

    return factory


def _installed_demo(source: str) -> pathlib.Path:
    # A failure, not a skip: CI installs both packages, and a missing one
    # must turn it red rather than quietly drop the only quantized tests.
    try:
        return sources.resolve(source)
    except ModelNotFound as exc:
        missing = exc.message
    pytest.fail(f"{missing} (tests/test_real_weights.py needs it)", pytrace=False)


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct Q4_1 (``demo``): real quantized weights, a ChatML template."""
    return _installed_demo(sources.DEMO)


@pytest.fixture(scope="session")
def gemma3_path() -> pathlib.Path:
    """Gemma 3 270M Q4_K_M (``demo:gemma3``): a base model whose file has no chat template."""
    return _installed_demo(sources.DEMO_GEMMA)


# -- shared by the engine and neuron test modules (a module's own fixture of
# the same name wins: test_llamacpp.py and test_ctransformers.py load differently)


@pytest.fixture(scope="module")
def pm():
    return plugin_manager()


@pytest.fixture
def load(pm):
    """``load(path, **options)``: a tiny model through the engine hook, one
    thread, unloaded after the test."""
    loaded = []

    def load(path, **options):
        options.setdefault("n_threads", 1)
        spec = LoadSpec(model_id="tiny", path=str(path), options=options)
        model = pm.hook.cortex_harness_load(spec=spec, placement=Placement())
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.unload()


@pytest.fixture
async def http(neuron):
    """An httpx client for the module's ``neuron`` fixture."""
    async with httpx.AsyncClient(base_url=neuron.url, timeout=30) as client:
        yield client


@pytest.fixture
async def client(neuron):
    """The official OpenAI SDK against the module's ``neuron`` fixture."""
    async with openai.AsyncOpenAI(
        base_url=neuron.url + "/v1", api_key="unused", max_retries=0
    ) as client:
        yield client
