"""The example config files, and the gateway's defaults."""

from __future__ import annotations

import pathlib

import httpx

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
