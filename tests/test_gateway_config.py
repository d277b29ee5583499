"""The example config files, and the gateway's defaults."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import attrs
import httpx
import pytest

from cortex import config
from cortex.gateway.app import Gateway

ETC = pathlib.Path(__file__).resolve().parent.parent / "etc"


def test_example_files_load() -> None:
    gateway = config.load(config.GatewayConfig, ETC / "cortex.toml", environ={})
    assert gateway.gateway.listen == "0.0.0.0:31313"
    assert [n.name for n in gateway.neurons] == ["local"]
    models = config.load_models(ETC / "models.toml")
    assert models.aliases["tier/small"] in {m.id for m in models.models}
    assert all(m.vram_mb > 0 for m in models.models)


def test_environment_overrides_the_file() -> None:
    environ = {"CORTEX_EVICTION_STRATEGY": "priority", "CORTEX_GATEWAY_API_KEYS": "a,b"}
    gateway = config.load(config.GatewayConfig, ETC / "cortex.toml", environ=environ)
    assert gateway.eviction.strategy == "priority"
    assert gateway.gateway.api_keys == ["a", "b"]


async def test_no_neurons_means_the_local_one() -> None:
    async with httpx.AsyncClient() as client:
        gateway = Gateway.build(config.GatewayConfig(), config.ModelsFile(), client)
    [neuron] = gateway.state.neurons.values()
    assert (neuron.name, neuron.endpoint) == ("local", "http://127.0.0.1:13131")


def _key_lines(path: pathlib.Path) -> set[str]:
    """Keys an example file shows, set or commented out (``# key = ...``)."""
    return set(re.findall(r"^#?\s*(\w+)\s*=", path.read_text(), re.MULTILINE))


@pytest.mark.parametrize(
    ("file", "classes"),
    [
        ("neuron.toml", (config.NeuronSection, config.NeuronModel)),
        (
            "cortex.toml",
            (
                config.GatewaySection,
                config.EvictionSection,
                config.RoutingSection,
                config.NeuronEndpoint,
            ),
        ),
        ("models.toml", (config.CatalogModel,)),
    ],
)
def test_every_key_is_in_its_example_file(file: str, classes: tuple[type, ...]) -> None:
    shown = _key_lines(ETC / file)
    missing = [f.name for cls in classes for f in attrs.fields(cls) if f.name not in shown]
    assert missing == [], f"etc/{file} lacks {missing}"


def _code_words(text: str) -> set[str]:
    """The words in ``code`` spans of ``text`` (fenced blocks left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return {w for span in re.findall(r"`([^`]+)`", text) for w in re.findall(r"\w+", span)}


def _readme_section(heading: str) -> str:
    text = (ETC.parent / "README.md").read_text()
    start = text.index(f"## {heading}\n")
    configuration = text.index("### Configuration\n", start)
    return text[configuration : text.index("\n### ", configuration + 1)]


@pytest.mark.parametrize(
    ("heading", "classes"),
    [
        ("The neuron", (config.NeuronSection, config.NeuronModel)),
        (
            "The gateway",
            (
                config.GatewaySection,
                config.EvictionSection,
                config.NeuronEndpoint,
                config.CatalogModel,
            ),
        ),
    ],
)
def test_every_key_is_in_the_readme(heading: str, classes: tuple[type, ...]) -> None:
    # [routing] has its own section (Scheduling); the table points there.
    words = _code_words(_readme_section(heading))
    missing = [f.name for cls in classes for f in attrs.fields(cls) if f.name not in words]
    assert missing == [], f"README's {heading} configuration lacks {missing}"


def test_every_routing_key_is_in_the_readme() -> None:
    words = _code_words((ETC.parent / "README.md").read_text())
    missing = [f.name for f in attrs.fields(config.RoutingSection) if f.name not in words]
    assert missing == []


@pytest.mark.parametrize("text", ["", " \n\n\t"])
def test_an_empty_models_file_is_refused(tmp_path, text: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match="the file is empty"):
        config.load_models(path)


def test_a_models_file_with_content_and_no_models_is_an_empty_catalogue(tmp_path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("# nothing served for now\n")
    assert config.load_models(path).models == []


@pytest.mark.parametrize("text", ["", "\n", "# keys go here\n"])
def test_a_keys_file_with_no_key_is_refused_at_start(tmp_path, text: str) -> None:
    # An empty or truncated keys file would leave the gateway open to anyone.
    keys = tmp_path / "keys"
    keys.write_text(text)
    toml = tmp_path / "cortex.toml"
    toml.write_text(f'[gateway]\napi_keys_file = "{keys}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "cortex", "--role", "gateway", "--config", str(toml)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"cortex: {keys}: no API key in it"
