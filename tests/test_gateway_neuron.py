"""The gateway in front of a real neuron with a tiny GGUF model (llama.cpp)."""

from __future__ import annotations

from functools import partial

import anthropic
import httpx
import openai
import pytest
import trio

from cortex.config import (
    CatalogModel,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
)
from cortex.gateway.app import run_gateway

pytest.importorskip("cortex_llamacpp")

from tests.neuron_helpers import running_neuron


async def test_cold_load_and_both_sdks_against_a_real_neuron(tiny_model_path) -> None:
    models = ModelsFile(
        models=[
            CatalogModel(
                id="t/tiny",
                source=str(tiny_model_path),
                vram_mb=50,
                options={"n_threads": 1},
                sampling={"temperature": 0.0},
            )
        ],
        aliases={"tiny": "t/tiny"},
    )
    with trio.fail_after(60):
        async with running_neuron(memory_budget_mb=2000) as neuron:
            config = GatewayConfig(
                gateway=GatewaySection(
                    listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", grace_period=1.0
                ),
                neurons=[NeuronEndpoint("n1", neuron.url)],
            )
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
                try:
                    async with openai.AsyncOpenAI(
                        base_url=gw.api_url + "/v1", api_key="x", max_retries=0
                    ) as client:
                        chat = await client.chat.completions.create(
                            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
                        )
                        assert chat.model == "t/tiny"
                        assert chat.usage is not None and chat.usage.completion_tokens == 8
                        stream = await client.chat.completions.create(
                            model="tiny",
                            messages=[{"role": "user", "content": "hi"}],
                            max_tokens=8,
                            stream=True,
                        )
                        text = "".join(
                            [c.choices[0].delta.content or "" async for c in stream if c.choices]
                        )
                        assert text == chat.choices[0].message.content  # greedy
                    async with anthropic.AsyncAnthropic(
                        base_url=gw.api_url, api_key="x", max_retries=0
                    ) as client:
                        async with client.messages.stream(
                            model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                        ) as events:
                            final = await events.get_final_message()
                        assert final.stop_reason == "max_tokens"
                        # The same prompt a third time: all but its last token is cached,
                        # and Anthropic's input_tokens counts only the rest.
                        usage = final.usage
                        assert usage.cache_read_input_tokens == chat.usage.prompt_tokens - 1
                        assert usage.input_tokens == 1
                        assert usage.cache_creation_input_tokens == 0
                        count = await client.messages.count_tokens(
                            model="tiny", messages=[{"role": "user", "content": "hi"}]
                        )
                        assert count.input_tokens == chat.usage.prompt_tokens
                    async with httpx.AsyncClient() as http:
                        metrics = (await http.get(gw.metrics_url + "/metrics")).text
                    assert 'cortex_cold_starts_total{model="t/tiny",neuron="n1"} 1.0' in metrics
                finally:
                    shutdown.set()
