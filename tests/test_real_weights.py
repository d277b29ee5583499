"""The demo models, real quantized weights, through a real neuron and gateway.

Every other engine test runs tiny random-weight F32 files: they cannot show
a crash in llama.cpp's quantized kernels (the README's own command once
segfaulted on the first request, on CPUs with AMX) nor a template that loses
the system prompt, since their answers are noise. These run the two demo
models: SmolLM2-135M-Instruct Q4_1 (``demo``, a ChatML template, answers
questions) and Gemma 3 270M Q4_K_M (``demo:gemma3``, a base model whose file
has no template: served with the ``gemma`` chat format, which has no system
role). A missing package fails these tests with the command that installs it.

One neuron and one gateway serve the whole module, in a thread of their own
(``served_in_a_thread``); decoding is greedy and short, on one thread.

Greedy output is reproducible only for the same computation. llama.cpp's
kernels round differently for different batch shapes (a prompt evaluated
whole or a token at a time, one sequence in a step or four) and with or
without repacked weights: measured here, the top candidates' log
probabilities move by up to 0.2 nats with the batch shape and by up to 0.4
with Gemma's repacked Q4_K weights. Where a test compares two different
computations its prompts have a wide margin between the first and second
candidate at every greedy step (noted beside them); elsewhere it makes the
two computations the same (a warm-up request puts both on a cached prompt).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import attrs
import httpx
import openai
import pytest
import trio

from cortex.config import CatalogModel, ModelsFile
from cortex.neuron import sources
from cortex.neuron.app import NeuronHandle
from cortex.neuron.models import LoadRequest
from tests.neuron_helpers import running_neuron, served_in_a_thread
from tests.scripted_helpers import running_gateway

pytest.importorskip("cortex_llamacpp")

from cortex_llamacpp.batched import DecoderStatistics

#: One thread: the machines running this suite have two shared cores.
OPTIONS = {"n_threads": 1, "n_ctx": 2048}
MODELS = {"smollm2": sources.DEMO, "gemma3": sources.DEMO_GEMMA}
FRANCE = "What is the capital of France? Answer in one word."
#: Both models continue it " 6, 7, 8, 9, 10," with margins over 1.8 nats.
COUNTING = "1, 2, 3, 4, 5,"
GREEDY: Any = {"temperature": 0}
#: Longer than SmolLM2's built-in default system prompt, which its template
#: adds when the caller sends none: a shorter one would shrink the prompt.
SYSTEM = (
    "You are a careful assistant for travellers in Europe. Answer in French, "
    "in one short sentence, and never mention that you are a language model. "
    "If a question is about the weather, say which tool you would call."
)
WEATHER: Any = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}


@attrs.frozen
class Served:
    neuron: NeuronHandle
    gateway_url: str

    @property
    def neuron_url(self) -> str:
        return self.neuron.url

    def decoder(self, model_id: str) -> DecoderStatistics:
        """The batched decoder's counters (thread-safe: taken under its lock)."""
        return self.neuron.neuron.manager.slots[model_id].model._decoder.statistics()


@asynccontextmanager
async def neuron_and_gateway() -> AsyncIterator[Served]:
    catalog = ModelsFile(models=[CatalogModel(id=model_id, vram_mb=400) for model_id in MODELS])
    # By source, as the README's command loads them: ``demo:gemma3`` brings
    # its chat format with it.
    async with running_neuron(MODELS.items(), options=OPTIONS) as neuron:
        async with running_gateway(neuron.url, catalog) as gateway:
            yield Served(neuron, gateway.api_url)


@pytest.fixture(scope="module")
def served(smollm2_path: Path, gemma3_path: Path) -> Iterator[Served]:
    with served_in_a_thread(neuron_and_gateway) as served:
        yield served


@asynccontextmanager
async def openai_client(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        yield client


@asynccontextmanager
async def clients(served: Served) -> AsyncIterator[dict[str, openai.AsyncOpenAI]]:
    """An OpenAI client for the neuron itself and one for the gateway."""
    async with (
        openai_client(served.neuron_url) as neuron,
        openai_client(served.gateway_url) as gateway,
    ):
        yield {"neuron": neuron, "gateway": gateway}


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


# -- answers ----------------------------------------------------------------------------


async def test_the_instruct_model_knows_the_capital_of_france(served: Served) -> None:
    with trio.fail_after(120):
        async with clients(served) as by_where:
            for where, client in by_where.items():
                reply = await client.chat.completions.create(
                    model="smollm2", messages=user(FRANCE), max_tokens=16, **GREEDY
                )
                assert "Paris" in (reply.choices[0].message.content or ""), where


async def test_a_character_cut_by_max_tokens_is_dropped_not_replaced(served: Served) -> None:
    # SmolLM2 writes Japanese one byte-level token at a time: every other
    # max_tokens ends inside a three-byte character.
    ask = user("Write the word 'cat' in Japanese characters only.")
    texts = []
    with trio.fail_after(120):
        async with openai_client(served.gateway_url) as client:
            for limit in range(1, 7):
                reply = await client.chat.completions.create(
                    model="smollm2", messages=ask, max_tokens=limit, **GREEDY
                )
                texts.append(reply.choices[0].message.content or "")
                chunks = await client.chat.completions.create(
                    model="smollm2", messages=ask, max_tokens=limit, stream=True, **GREEDY
                )
                streamed = "".join([c.choices[0].delta.content or "" async for c in chunks])
                assert streamed == texts[-1]
    assert not any("\ufffd" in text for text in texts), texts
    # The cut characters are dropped: some limits add no text.
    assert len(set(texts)) < len(texts) and any(texts), texts


@pytest.mark.parametrize("model", MODELS)
async def test_chat_and_completions_on_both_models(served: Served, model: str) -> None:
    """Real text from both endpoints; Gemma's chat goes through the ``gemma`` format.

    With no template and no chat format llama-cpp-python guesses ``llama-2``
    for Gemma, and its chat answers come back empty.
    """
    with trio.fail_after(120):
        async with openai_client(served.gateway_url) as client:
            chat = await client.chat.completions.create(
                model=model, messages=user("Tell me about Paris."), max_tokens=12, **GREEDY
            )
            completion = await client.completions.create(
                model=model, prompt=COUNTING, max_tokens=12, **GREEDY
            )
    assert (chat.choices[0].message.content or "").strip()
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert chat.choices[0].finish_reason in ("stop", "length")
    # Noise would not count on: the weights and the kernels work.
    assert completion.choices[0].text.startswith(" 6, 7, 8")
    assert completion.usage is not None and completion.usage.completion_tokens == 12


@pytest.mark.parametrize("model", MODELS)
async def test_top_p_0_keeps_the_most_likely_token_whatever_the_seed(
    served: Served, model: str
) -> None:
    """``top_p: 0`` at ``temperature: 1`` is greedy: llama.cpp keeps one candidate."""
    ask = user("Tell me about Paris.")
    with trio.fail_after(120):
        async with openai_client(served.gateway_url) as client:

            async def texts(top_p: float) -> set[str]:
                replies = [
                    await client.chat.completions.create(
                        model=model,
                        messages=ask,
                        max_tokens=12,
                        temperature=1,
                        top_p=top_p,
                        seed=seed,
                    )
                    for seed in range(4)
                ]
                return {reply.choices[0].message.content or "" for reply in replies}

            sampled, kept = await texts(1), await texts(0)
            counting = await client.completions.create(
                model=model, prompt=COUNTING, max_tokens=8, temperature=1, top_p=0, seed=7
            )
    assert len(sampled) > 1, sampled  # else the next check would prove nothing
    assert len(kept) == 1, kept
    assert counting.choices[0].text.startswith(" 6, 7, 8")


@pytest.mark.parametrize("model", MODELS)
async def test_streaming_equals_non_streaming(served: Served, model: str) -> None:
    """Greedy decoding: the same text, finish reason and usage either way, both endpoints.

    Each prompt is sent once first, so that both compared requests find it
    cached and evaluate only its last token: the same computation.
    """
    with trio.fail_after(180):
        async with openai_client(served.gateway_url) as client:
            await client.chat.completions.create(
                model=model, messages=user(FRANCE), max_tokens=1, **GREEDY
            )
            chat = await client.chat.completions.create(
                model=model, messages=user(FRANCE), max_tokens=16, **GREEDY
            )
            stream = await client.chat.completions.create(
                model=model,
                messages=user(FRANCE),
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
            text, finish, usage = "", None, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            assert (text, finish) == (
                chat.choices[0].message.content,
                chat.choices[0].finish_reason,
            )
            assert usage == chat.usage

            prompt = "Once upon a time, in a small village,"
            await client.completions.create(model=model, prompt=prompt, max_tokens=1, **GREEDY)
            whole = await client.completions.create(
                model=model, prompt=prompt, max_tokens=16, **GREEDY
            )
            pieces = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
            text, finish, usage = "", None, None
            async for piece in pieces:
                if piece.choices:
                    text += piece.choices[0].text
                    finish = piece.choices[0].finish_reason or finish
                usage = piece.usage or usage
            assert (text, finish) == (whole.choices[0].text, whole.choices[0].finish_reason)
            assert usage == whole.usage


# -- what a template must not drop ------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
async def test_anthropic_system_and_tools_reach_the_prompt(served: Served, model: str) -> None:
    """Through the gateway's Anthropic route: the prompt grows by the system text, then the tools.

    A template that dropped either would leave ``input_tokens`` where it
    was. Gemma's format has no system role: the text is folded into the
    first user turn, and the tools are written there too.
    """
    messages: Any = user("What is the weather like in Paris today?")
    asks: list[dict[str, Any]] = [{}, {"system": SYSTEM}, {"system": SYSTEM, "tools": [WEATHER]}]
    counts = []
    with trio.fail_after(180):
        async with anthropic.AsyncAnthropic(
            base_url=served.gateway_url, api_key="unused", max_retries=0, timeout=120
        ) as client:
            for ask in asks:
                reply = await client.messages.create(
                    model=model, messages=messages, max_tokens=4, extra_body=GREEDY, **ask
                )
                assert reply.stop_reason in ("max_tokens", "end_turn", "tool_use")
                counts.append(reply.usage.input_tokens)
    plain, with_system, with_tools = counts
    # Measured: SmolLM2 39, 67, 247 (SYSTEM replaces its 20-token default
    # system prompt); Gemma 18, 63, 236.
    assert with_system >= plain + 15, counts
    assert with_tools >= with_system + 50, counts


# -- a prefill ----------------------------------------------------------------------------


async def test_an_anthropic_prefill_is_continued_not_repeated(served: Served) -> None:
    """A final assistant turn is continued, whole and streamed, with its stop sequences.

    The answer is the continuation only: ``" 4, 5, ..."``, not a fresh
    reply that starts over (``"1, 2, 3, 4"``, what a finished turn gets).
    The prompt is sent once first, so that the compared requests both find
    it cached and evaluate only its last token: the same computation.
    """
    ask: Any = {
        "model": "smollm2",
        "messages": [
            {"role": "user", "content": "Count from 1 to 10 separated by commas."},
            {"role": "assistant", "content": "1, 2, 3,"},
        ],
        "extra_body": GREEDY,
    }
    with trio.fail_after(180):
        async with anthropic.AsyncAnthropic(
            base_url=served.gateway_url, api_key="unused", max_retries=0, timeout=120
        ) as client:
            await client.messages.create(**ask, max_tokens=1)
            whole = await client.messages.create(**ask, max_tokens=10)
            async with client.messages.stream(**ask, max_tokens=10) as stream:
                streamed = await stream.get_final_message()
            stopped = await client.messages.create(**ask, max_tokens=10, stop_sequences=[" 6"])
            counted = await client.messages.count_tokens(model="smollm2", messages=ask["messages"])
            # Forcing JSON, the common use: the answer goes on with the value.
            json_reply = await client.messages.create(
                model="smollm2",
                messages=[
                    {"role": "user", "content": "Give the capital of France as a JSON object."},
                    {"role": "assistant", "content": '{"name":'},
                ],
                max_tokens=4,
                extra_body=GREEDY,
            )
    texts = [reply.content[0].text for reply in (whole, streamed)]  # type: ignore[union-attr]
    assert texts[0].startswith(" 4, 5, 6"), texts
    assert texts[1] == texts[0]
    assert (whole.stop_reason, streamed.stop_reason) == ("max_tokens", "max_tokens")
    assert stopped.content[0].text == " 4, 5,"  # type: ignore[union-attr]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", " 6")
    assert json_reply.content[0].text.startswith(' "'), json_reply  # type: ignore[union-attr]
    for reply in (whole, streamed, stopped):
        usage = reply.usage
        assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens


# -- load -------------------------------------------------------------------------------


#: Answered alone, each keeps a margin of at least 0.56 nats between its
#: first and second candidates at every step ("Write a haiku about the sea."
#: has a 0.07 tie at its 14th token, and flips when batched with others).
QUESTIONS = [
    FRANCE,
    "What is the capital of Germany? Answer in one word.",
    "What is the capital of England? Answer in one word.",
    "What is the capital of Greece? Answer in one word.",
    "What is the capital of Russia? Answer in one word.",
    "What is the chemical symbol for gold? Answer in one word.",
]


async def stream_chat(client: openai.AsyncOpenAI, question: str) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(
        model="smollm2", messages=user(question), max_tokens=16, stream=True, **GREEDY
    )
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def test_six_concurrent_streams_and_a_neuron_that_survives_them(served: Served) -> None:
    """Six streams at once (four decoded together, two waiting) answer as each does alone.

    The batched engine keeps its slots' cells in one KV cache (per-slot
    streams here, where they fit; a unified pool elsewhere): a sequence
    that read or wrote another's cells would change its greedy answer.
    """
    with trio.fail_after(300):
        async with openai_client(served.gateway_url) as client:
            alone = [await stream_chat(client, question) for question in QUESTIONS]
            together: list[Any] = [None] * len(QUESTIONS)
            before = served.decoder("smollm2")

            async def ask(n: int) -> None:
                together[n] = await stream_chat(client, QUESTIONS[n])

            async with trio.open_nursery() as nursery:
                for n in range(len(QUESTIONS)):
                    nursery.start_soon(ask, n)
            after = served.decoder("smollm2")
            # Decoded together: fewer steps than tokens.
            assert after.steps - before.steps < after.generated_tokens - before.generated_tokens
            assert together == alone
            assert all(finish == "stop" for _, finish in alone)
            assert [text.split()[-1] for text, _ in alone] == [
                "Paris.",
                "Berlin.",
                "London.",
                "Athens.",
                "Moscow.",
                "Au.",
            ]

        async with httpx.AsyncClient(base_url=served.neuron_url, timeout=30) as http:
            health = await http.get("/health")
            assert health.status_code == 200
            assert health.json()["in_flight"] == 0
            models = {m["id"]: m["status"] for m in (await http.get("/models")).json()}
            assert models == {"smollm2": "loaded", "gemma3": "loaded"}
        async with openai_client(served.neuron_url) as client:
            again = await client.chat.completions.create(
                model="smollm2", messages=user(FRANCE), max_tokens=16, **GREEDY
            )
            assert "Paris" in (again.choices[0].message.content or "")


async def test_the_next_turn_reads_its_prefix_from_its_slot(served: Served) -> None:
    """A conversation's next turn reuses the cells its slot kept, with per-slot KV streams.

    They are the default where ``parallel x n_ctx`` cells fit the memory
    plan, as they do here: each slot is a stream of its own, and the slot
    that served a turn still holds it for the next.
    """
    with trio.fail_after(180):
        async with httpx.AsyncClient(base_url=served.neuron_url, timeout=30) as http:
            models = (await http.get("/models")).json()
        assert {m["id"]: m["kv_layout"] for m in models} == {
            "smollm2": "per-slot",
            "gemma3": "per-slot",
        }
        async with openai_client(served.neuron_url) as client:
            # Past the 64 tokens a prompt must share to take a slot's cache.
            messages: Any = user(
                "Some capitals: Paris, Berlin, Madrid, Rome, Lisbon, Vienna, Prague, "
                "Warsaw, Athens, Dublin, Brussels, Amsterdam, Copenhagen, Stockholm, "
                "Oslo, Helsinki, Budapest, Bucharest, Sofia, Zagreb. Name three rivers "
                "in Europe."
            )
            first = await client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=24, **GREEDY
            )
            before = served.decoder("smollm2").prompt_cache
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content},
                *user(FRANCE),
            ]
            second = await client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=16, **GREEDY
            )
            after = served.decoder("smollm2").prompt_cache
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # The whole first turn came from the slot, not the host tier.
    assert first.usage.prompt_tokens > 64
    assert details.cached_tokens >= first.usage.prompt_tokens
    assert after.slot_tokens - before.slot_tokens == details.cached_tokens
    assert after.host_restores == before.host_restores
    assert "Paris" in (second.choices[0].message.content or "")


async def test_a_reminder_after_the_users_turn_keeps_the_next_turns_prefix(
    served: Served,
) -> None:
    """Gemma has no system role, and sliding-window layers: a prompt that changes
    anywhere before its end is processed again whole. Claude Code's reminder
    right after the user's turn is folded into that turn, where it stays."""
    with trio.fail_after(180):
        async with openai_client(served.neuron_url) as client:
            messages: Any = [
                {"role": "system", "content": SYSTEM},
                *user(
                    "Some capitals: Paris, Berlin, Madrid, Rome, Lisbon, Vienna, Prague, "
                    "Warsaw, Athens, Dublin. Name three rivers in Europe."
                ),
                {"role": "system", "content": "Reminder: today is Tuesday. Be brief."},
            ]
            first = await client.chat.completions.create(
                model="gemma3", messages=messages, max_tokens=12, **GREEDY
            )
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content},
                *user(FRANCE),
            ]
            second = await client.chat.completions.create(
                model="gemma3", messages=messages, max_tokens=8, **GREEDY
            )
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert first.usage.prompt_tokens > 64
    assert details.cached_tokens >= first.usage.prompt_tokens


# -- llama.cpp's extra CPU buffers ------------------------------------------------------


@pytest.mark.parametrize("source", MODELS.values())
async def test_extra_buffers_on_and_off_give_the_same_text(source: str) -> None:
    """With and without llama.cpp's extra weight buffers: both run, and count alike.

    ``extra_buffers = auto`` turns them off only where the llama.cpp build
    carries AMX, whose kernels segfault on quantized weights (FINDINGS.md,
    llama.cpp issue 20824); everywhere else both settings must run and
    agree. On an AMX build "on" is the crash this test would then show.
    Not bit for bit: Gemma's Q4_K weights are repacked for wider SIMD and
    round differently (a near tie can go either way: "The chemical symbol
    for gold is" gives " gold." with them and " Au." without), so the
    prompt is one with wide margins.
    """
    chat_format = sources.DEMO_CHAT_FORMATS.get(source)
    with trio.fail_after(180):
        async with running_neuron() as neuron:
            for setting in ("on", "off"):
                await neuron.neuron.manager.load(
                    LoadRequest(
                        model_id=setting,
                        source=source,
                        chat_format=chat_format,
                        options={**OPTIONS, "extra_buffers": setting, "parallel": 1},
                    )
                )
            async with openai_client(neuron.url) as client:
                texts = {}
                for setting in ("on", "off"):
                    completion = await client.completions.create(
                        model=setting, prompt=COUNTING, max_tokens=16, **GREEDY
                    )
                    texts[setting] = completion.choices[0].text
    assert texts["on"] == texts["off"]
    assert texts["on"].startswith(" 6, 7, 8, 9, 10,")
