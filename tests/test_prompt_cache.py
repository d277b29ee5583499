"""The prompt cache: slots, the llama.cpp engine's host tier, and usage that says so.

Decoder tests run on tiny F32 models, where a sequence's logits do not
depend on what else is in the batch: a sequence whose KV state came back
from host memory must continue exactly as on a fresh model.
"""

from __future__ import annotations

import ctypes
import threading
from functools import partial

import anthropic
import httpx
import numpy as np
import openai
import pytest
import trio

from cortex.config import CatalogModel, GatewayConfig, GatewaySection, ModelsFile, NeuronEndpoint
from cortex.gateway.app import run_gateway
from cortex.harness import (
    BLOCK_TOKENS,
    Placement,
    Sampling,
    prefix_hashes,
)
from cortex.neuron import sources

pytest.importorskip("cortex_llamacpp")

from cortex_llamacpp.hostcache import MIN_TOKENS, HostCache
from cortex_llamacpp.options import MIB, LoadOptions, default_host_cache_mb
from tests.fixtures.tinymodel import write_tiny_model
from tests.neuron_helpers import running_neuron

GREEDY = Sampling(temperature=0.0)
SYSTEM = "You are a careful assistant who answers briefly. " * 8


def document(i: int) -> str:
    return f"Document {i}: " + " ".join(f"item{i}-{k}" for k in range(60))


@pytest.fixture(scope="module")
def long_model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-2k.gguf", n_ctx=2048)


#: Both KV layouts: a unified pool, and one stream per slot (what
#: ``kv_unified = "auto"`` takes where it fits; no budget here, so it does).
LAYOUTS = pytest.mark.parametrize("kv_unified", [True, "auto"], ids=["unified", "per-slot"])


def laid_out(model, kv_unified) -> object:
    """``model``, checked to have the layout ``kv_unified`` asked for."""
    assert model.kv_layout == ("unified" if kv_unified is True else "per-slot")
    return model


def run(model, tokens: list[int], n: int) -> tuple[list[int], int]:
    """Greedy ids after ``tokens``, and the cached tokens the first one reported."""
    ids, cached = [], None
    iterator = model.generate(tokens, GREEDY)
    try:
        for token in iterator:
            if cached is None:
                cached = token.cached_tokens
            ids.append(token.id)
            if len(ids) == n:
                break
    finally:
        iterator.close()
    return ids, cached or 0


# -- the host tier's bookkeeping -------------------------------------------------------


def state(nbytes: int) -> ctypes.Array:
    return (ctypes.c_uint8 * nbytes)()


def test_host_cache_finds_the_longest_shared_prefix_and_stays_in_budget():
    cache = HostCache(budget_bytes=1000)
    a = np.arange(200, dtype=np.int32)
    b = np.concatenate([a[:100], np.arange(1000, 1100, dtype=np.int32)])
    cache.add(a, state(400))
    cache.add(b, state(400))
    entry, n = cache.match(np.concatenate([a[:150], [7, 7]]).astype(np.int32), limit=10_000)
    assert entry is not None and entry.tokens is a and n == 150
    entry, n = cache.match(b, limit=120)  # capped: the last token is evaluated again
    assert entry is not None and entry.tokens is b and n == 120
    assert cache.covers(a[:180]) and not cache.covers(np.arange(5, 100, dtype=np.int32))
    # A third state does not fit beside both: the least recently used goes
    # (b: a was used by ``covers`` just now).
    c = np.arange(500, 700, dtype=np.int32)
    cache.add(c, state(400))
    assert (len(cache), cache.used_bytes, cache.evictions) == (2, 800, 1)
    assert cache.match(b, limit=10_000)[1] == 100  # only the prefix a shares with it
    assert not cache.fits(1001) and cache.fits(1000)


def test_a_longer_state_supersedes_the_one_it_extends():
    cache = HostCache(budget_bytes=10_000)
    turn1 = np.arange(300, dtype=np.int32)
    # The next turn shares all but a few of turn 1's tokens (a re-tokenized
    # reply), then goes on.
    turn2 = np.concatenate([turn1[:-3], np.arange(5000, 5100, dtype=np.int32)])
    cache.add(turn1, state(100))
    cache.add(turn2, state(100))
    assert len(cache) == 1 and cache.evictions == 0 and cache.saves == 2
    assert cache.blocks() == [tuple(prefix_hashes(turn2.tolist()))]


def test_prefix_hashes_name_whole_blocks_of_a_prefix():
    tokens = list(range(3 * BLOCK_TOKENS + 10))
    hashes = prefix_hashes(tokens)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    assert prefix_hashes(tokens[: 2 * BLOCK_TOKENS]) == hashes[:2]
    # A change in the first block changes every hash after it.
    other = prefix_hashes([1, *tokens[1:]])
    assert all(x != y for x, y in zip(hashes, other, strict=True))
    assert prefix_hashes(tokens[: BLOCK_TOKENS - 1]) == []


def test_host_cache_mb_defaults_to_eight_pools_within_an_eighth_of_a_cpu_budget():
    pool = 180 * MIB  # SmolLM2's 8192 cells
    assert default_host_cache_mb(budget_mb=21000, gpu=False, pool_bytes=pool) == 1440
    assert default_host_cache_mb(budget_mb=8000, gpu=False, pool_bytes=pool) == 1000
    assert default_host_cache_mb(budget_mb=None, gpu=True, pool_bytes=pool) == 512
    assert default_host_cache_mb(budget_mb=None, gpu=True, pool_bytes=MIB) == 8
    assert LoadOptions.from_spec("m", {}, None, Placement()).host_cache_mb is None
    options = LoadOptions.from_spec("m", {"host_cache_mb": 0}, None, Placement())
    assert options.host_cache_mb == 0


# -- the decoder -----------------------------------------------------------------------


@LAYOUTS
def test_sessions_beyond_the_slots_get_their_cache_back(load, long_model_path, kv_unified):
    # Five sessions take turns on two slots: each turn finds its slot taken
    # by another session, and its state in host memory.
    model = laid_out(load(long_model_path, parallel=2, kv_unified=kv_unified), kv_unified)
    fresh = load(long_model_path, parallel=2, host_cache_mb=0)
    sessions = [model.tokenize(SYSTEM + document(i)) for i in range(5)]
    assert 800 < len(sessions[0]) < 1000
    for turn in range(3):
        for i, history in enumerate(sessions):
            prompt = history + model.tokenize(f" Question {turn}?", add_bos=False)
            ids, cached = run(model, prompt, 12)
            want, fresh_cached = run(fresh, prompt, 12)
            assert ids == want
            if turn > 0:
                # The last turn's prompt and reply came back (but maybe the
                # reply's last token, which its sequence never fed).
                assert cached >= len(history) - 1
                assert cached > fresh_cached
            sessions[i] = prompt + ids
    stats = model._decoder.statistics()
    assert stats.prompt_cache.host_restores >= 10 and stats.prompt_cache.host_failures == 0
    assert stats.prompt_cache.host_tokens >= 10 * len(sessions[0]) // 2
    cache = model.prompt_cache()
    assert cache.host_entries >= 3  # at least the sessions not in a slot
    assert cache.hits == 14 and cache.misses == 1
    assert 0 < cache.host_bytes <= cache.host_budget_bytes
    # Without the host tier only the shared system prompt survives.
    assert fresh.prompt_cache().host_restores == 0


def test_the_host_tier_stays_within_its_budget(load, long_model_path):
    # About 0.45 MB per session: a 1 MiB tier holds two.
    model = load(long_model_path, parallel=2, host_cache_mb=1)
    prompts = [model.tokenize(SYSTEM + document(i)) for i in range(6)]
    for prompt in prompts:
        run(model, prompt, 4)
    stats = model._decoder.statistics()
    assert stats.prompt_cache.host_saves >= 4 and stats.prompt_cache.host_evictions >= 1
    assert 0 < stats.prompt_cache.host_bytes <= 1024 * 1024
    assert stats.prompt_cache.host_entries <= 2
    # The most recently saved comes back; the oldest is gone.
    assert run(model, prompts[3] + [65], 4)[1] >= len(prompts[3])
    assert run(model, prompts[0] + [65], 4)[1] < len(prompts[0]) - MIN_TOKENS


def test_short_prompts_are_not_saved(load, long_model_path):
    model = load(long_model_path, parallel=2)
    for i in range(6):
        run(model, model.tokenize(f"Hello {i}"), 4)
    assert model._decoder.statistics().prompt_cache.host_saves == 0


@LAYOUTS
def test_concurrent_sessions_keep_exact_outputs(load, long_model_path, kv_unified):
    # More sessions than slots, all at once: seats, saves and restores
    # interleave with other sequences' decoding.
    alone = load(long_model_path, parallel=1)
    model = laid_out(load(long_model_path, parallel=3, kv_unified=kv_unified), kv_unified)
    prompts = [model.tokenize(SYSTEM + document(i)) for i in range(6)]
    expected = [run(alone, p, 16)[0] for p in prompts]
    for _ in range(2):
        results: list[list[int] | None] = [None] * len(prompts)

        def session(i: int) -> None:
            results[i] = run(model, prompts[i], 16)[0]  # noqa: B023

        threads = [threading.Thread(target=session, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert results == expected
    assert model._decoder.statistics().prompt_cache.host_restores >= 1


# -- usage and reporting through a neuron and a gateway --------------------------------


async def test_openai_sdk_reports_cached_tokens_and_the_neuron_reports_its_cache(
    long_model_path,
) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": document(1)}]
    options = {"n_threads": 1, "parallel": 2}
    with trio.fail_after(60):
        async with running_neuron([("tiny", str(long_model_path))], options=options) as neuron:
            async with openai.AsyncOpenAI(
                base_url=neuron.url + "/v1", api_key="x", max_retries=0
            ) as client:
                first = await client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=4, temperature=0
                )
                assert first.usage.prompt_tokens_details.cached_tokens == 0
                again = await client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=4, temperature=0
                )
                prompt = again.usage.prompt_tokens
                assert again.usage.prompt_tokens_details.cached_tokens == prompt - 1
                stream = await client.chat.completions.create(
                    model="tiny",
                    messages=messages,
                    max_tokens=4,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                usage = [chunk.usage async for chunk in stream if chunk.usage][-1]
                assert usage.prompt_tokens_details.cached_tokens == prompt - 1
                response = await client.responses.create(
                    model="tiny",
                    instructions=SYSTEM,
                    input=document(1),
                    max_output_tokens=4,
                    temperature=0,
                )
                assert response.usage.input_tokens_details.cached_tokens == prompt - 1
            async with httpx.AsyncClient(base_url=neuron.url) as http:
                [status] = (await http.get("/models")).json()
                cache = status["prompt_cache"]
                assert (cache["hits"], cache["misses"]) == (3, 1)
                assert cache["slot_tokens"] == 3 * (prompt - 1)
                assert cache["block_tokens"] == BLOCK_TOKENS
                assert len(cache["blocks"]) >= prompt // BLOCK_TOKENS
                metrics = (await http.get("/metrics")).text
            assert (
                f'cortex_neuron_prompt_tokens_cached_total{{model="tiny"}} {3.0 * (prompt - 1)}'
                in (metrics)
            )
            assert 'cortex_neuron_prompt_cache_requests_total{model="tiny",result="hit"} 3.0' in (
                metrics
            )
            assert 'cortex_neuron_prompt_cache_reused_tokens_total{model="tiny",tier="host"}' in (
                metrics
            )
            assert 'cortex_neuron_prompt_cache_host_budget_bytes{model="tiny"}' in metrics


async def test_anthropic_sdk_reads_the_host_tier_through_the_gateway(long_model_path) -> None:
    # Three sessions on two slots, through the gateway's Anthropic dialect.
    models = ModelsFile(
        models=[
            CatalogModel(
                id="t/tiny",
                source=str(long_model_path),
                vram_mb=50,
                options={"n_threads": 1, "parallel": 2},
                sampling={"temperature": 0.0},
            )
        ]
    )
    with trio.fail_after(90):
        async with running_neuron(memory_budget_mb=2000) as neuron:
            config = GatewayConfig(
                gateway=GatewaySection(
                    listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", grace_period=1
                ),
                neurons=[NeuronEndpoint("n1", neuron.url)],
            )
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
                try:
                    async with anthropic.AsyncAnthropic(
                        base_url=gw.api_url, api_key="x", max_retries=0
                    ) as client:

                        async def turn(i: int, question: str):
                            async with client.messages.stream(
                                model="t/tiny",
                                max_tokens=4,
                                system=SYSTEM,
                                messages=[{"role": "user", "content": document(i) + question}],
                            ) as events:
                                return (await events.get_final_message()).usage

                        firsts = [await turn(i, " Why?") for i in range(3)]
                        assert firsts[0].cache_read_input_tokens == 0
                        again = await turn(0, " Why not?")
                        # Sessions 1 and 2 took session 0's slot (they share its
                        # system prompt); all but the new question came back from
                        # host memory.
                        assert again.cache_read_input_tokens >= firsts[0].input_tokens - 20
                        assert again.cache_creation_input_tokens == 0
                finally:
                    shutdown.set()


# -- the real demo model -----------------------------------------------------------------


@pytest.mark.slow
def test_a_restored_state_continues_like_a_fresh_prefill(load) -> None:
    # SmolLM2 Q4_1: the restored cells must be the very cells a prefill makes.
    path = sources.resolve("demo")
    model = load(path, parallel=2, n_ctx=2048)
    fresh = load(path, parallel=2, n_ctx=2048, host_cache_mb=0)
    chats = [
        model.tokenize(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{document(i)}<|im_end|>\n"
        )
        for i in range(3)
    ]
    for chat in chats:
        run(model, chat, 2)
    question = model.tokenize(
        "<|im_start|>user\nWhat is the first item?<|im_end|>\n<|im_start|>assistant\n",
        add_bos=False,
    )
    prompt = chats[0] + question
    ids, cached = run(model, prompt, 16)
    assert cached >= len(chats[0])
    assert model._decoder.statistics().prompt_cache.host_restores == 1
    assert ids == run(fresh, prompt, 16)[0]


def test_a_restore_survives_its_own_eviction_from_a_full_host_tier(load, long_model_path):
    # A 1 MiB tier holds one ~0.75 MB state. Restoring session 1 first saves
    # the slot it goes into, which evicts session 1's own state. (The pool
    # holds both slots' sessions: no state is saved for room.)
    model = load(long_model_path, parallel=2, host_cache_mb=1, kv_cells=4096)
    fresh = load(long_model_path, parallel=2, host_cache_mb=0)
    prompts = [
        model.tokenize(f"Session {i}. " + SYSTEM + document(i) + document(i + 10)) for i in range(4)
    ]
    for prompt in prompts:  # 0, 1 into the empty slots; 2, 3 into the least recently used
        run(model, prompt, 4)
    stats = model._decoder.statistics()
    assert (stats.prompt_cache.host_saves, stats.prompt_cache.host_entries) == (2, 1)
    again = prompts[1] + model.tokenize(" More?", add_bos=False)
    ids, cached = run(model, again, 8)
    assert cached >= len(prompts[1])
    assert ids == run(fresh, again, 8)[0]
    stats = model._decoder.statistics()
    assert stats.prompt_cache.host_restores == 1 and stats.prompt_cache.host_entries == 1


def test_statistics_show_an_empty_host_tier_and_its_budget(load, long_model_path):
    model = load(long_model_path, parallel=2, host_cache_mb=3)
    cache = model.prompt_cache()
    assert (cache.host_budget_bytes, cache.host_entries, cache.host_bytes) == (3 << 20, 0, 0)
    assert load(long_model_path, parallel=2, host_cache_mb=0).prompt_cache().host_budget_bytes == 0


def test_the_single_sequence_engine_reports_its_prefix_reuse(load, long_model_path):
    model = load(long_model_path, parallel=1)
    prompt = model.tokenize(SYSTEM + document(1))
    first, cached = run(model, prompt, 4)
    assert cached == 0
    again, cached = run(model, prompt, 4)
    assert again == first and cached == len(prompt) - 1
    cache = model.prompt_cache()
    assert (cache.hits, cache.misses, cache.slot_tokens) == (1, 1, len(prompt) - 1)
    assert cache.host_budget_bytes == 0
