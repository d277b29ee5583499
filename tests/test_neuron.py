"""The neuron over HTTP with the real llama.cpp engine and tiny GGUF models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import openai
import pytest
import trio

from cortex.neuron.app import NeuronHandle
from cortex.neuron.models import LoadRequest
from cortex.testing import FakeEngine
from tests.neuron_helpers import running_neuron

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture
async def neuron(tiny_model_path: Path):
    async with running_neuron([("tiny", str(tiny_model_path))]) as handle:
        yield handle


# -- fleet API ------------------------------------------------------------------------


async def test_discovery_and_health(http: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        discovery = (await http.get("/discovery")).json()
        health = (await http.get("/health")).json()
    assert discovery["hostname"]
    assert discovery["cpu"]["cores"] >= 1
    assert discovery["ram_total_mb"] > 0
    assert discovery["devices"] == []
    assert "llamacpp" in [h["name"] for h in discovery["harnesses"]]
    assert health["devices"] == []
    assert health["memory"]["total_mb"] == 4096
    assert 0 < health["memory"]["used_mb"] < 4096
    assert health["activation"] == {"in_progress": [], "pending": [], "failed": []}
    assert health["queue_depth"] == 0


async def test_models_lifecycle(http: httpx.AsyncClient, tiny_model_factory) -> None:
    other = tiny_model_factory("other.gguf", seed=7)
    with trio.fail_after(30):
        models = (await http.get("/models")).json()
        assert [(m["id"], m["status"], m["harness"]) for m in models] == [
            ("tiny", "loaded", "llamacpp")
        ]
        assert models[0]["n_ctx"] == 512
        assert models[0]["memory_mb"] > 0
        # parallel 8 x 512 cells fit the budget: per-slot KV streams.
        assert models[0]["kv_layout"] == "per-slot"

        # Two concurrent loads of one id load once.
        results = []

        async def load() -> None:
            response = await http.post(
                "/models/load",
                json={
                    "model_id": "org/other-model",
                    "source": str(other),
                    "options": {"n_threads": 1, "kv_unified": True},
                },
            )
            results.append(response)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            nursery.start_soon(load)
        assert [r.status_code for r in results] == [200, 200]
        assert results[0].json()["model"]["loaded_at"] == results[1].json()["model"]["loaded_at"]
        assert results[0].json()["model"]["kv_layout"] == "unified"

        endpoint = await http.get("/models/org/other-model/endpoint")
        assert endpoint.json()["url"].endswith("/v1")

        listed = (await http.get("/v1/models")).json()
        assert {m["id"] for m in listed["data"]} == {"tiny", "org/other-model"}

        unloaded = await http.post("/models/unload", json={"model_id": "org/other-model"})
        assert unloaded.json() == {
            "status": "unloaded",
            "model_id": "org/other-model",
            "cancelled": 0,
        }
        again = await http.post("/models/unload", json={"model_id": "org/other-model"})
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "model_not_found"


def _truncated_copy(source: Path, path: Path) -> Path:
    path.write_bytes(source.read_bytes()[:-4096])
    return path


async def test_failed_loads_leave_others_serving(
    http: httpx.AsyncClient, client: openai.AsyncOpenAI, tmp_path: Path, tiny_model_path: Path
) -> None:
    corrupt = tmp_path / "secret-dir" / "corrupt.gguf"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with trio.fail_after(30):
        missing = await http.post(
            "/models/load", json={"model_id": "m", "source": str(tmp_path / "nope.gguf")}
        )
        assert missing.status_code == 404
        bad = await http.post("/models/load", json={"model_id": "c", "source": str(corrupt)})
        assert bad.status_code == 422
        error = bad.json()["error"]
        assert error["code"] == "invalid_model_file"
        assert "corrupt.gguf" in error["message"] and "secret-dir" not in error["message"]
        truncated = _truncated_copy(tiny_model_path, tmp_path / "truncated.gguf")
        cut = await http.post("/models/load", json={"model_id": "t", "source": str(truncated)})
        assert cut.status_code == 422
        assert cut.json()["error"]["code"] == "invalid_model_file"
        foreign = tmp_path / "secret-dir" / "weights.zip"
        foreign.write_bytes(b"PK\x03\x04" + bytes(200))
        other = await http.post("/models/load", json={"model_id": "z", "source": str(foreign)})
        assert other.status_code == 422
        error = other.json()["error"]
        assert error["code"] == "unsupported_model_format"
        assert "weights.zip" in error["message"] and "secret-dir" not in error["message"]
        for odd, param in (
            ({"options": {"n_ctxx": 512}}, "options"),
            ({"options": {"n_ctx": "big"}}, "options"),
            ({"options": {"parallel": 10**6}}, "options"),
            ({"options": {"kv_unified": "per-slot"}}, "options"),
            ({"chat_format": "no-such-format"}, "chat_format"),
        ):
            load = {"model_id": "o", "source": str(tiny_model_path), **odd}
            refused = await http.post("/models/load", json=load)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["code"] == "invalid_model_options" and error["param"] == param
        named = {"model_id": "z", "source": str(foreign), "harness": "llamacpp"}
        other = await http.post("/models/load", json=named)
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "unsupported_model_format"
        nobody = await http.post(
            "/models/load", json={"model_id": "x", "source": str(corrupt), "harness": "nope"}
        )
        assert nobody.status_code == 503
        invalid = await http.post("/models/load", json={"source": "x"})
        assert invalid.status_code == 400
        for key in ("harness", "chat_format"):
            empty = {"model_id": "e", "source": str(tiny_model_path), key: ""}
            refused = await http.post("/models/load", json=empty)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == key
        reply = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
        assert reply.choices[0].message.content


# -- inference ------------------------------------------------------------------------


async def test_chat_completion(client: openai.AsyncOpenAI, neuron: NeuronHandle) -> None:
    with trio.fail_after(30):
        reply = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=8, temperature=0
        )
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    model = neuron.neuron.manager.slots["tiny"].model
    prompt = model.render_chat(CHAT)
    assert reply.usage.prompt_tokens == len(model.tokenize(prompt.text, add_bos=prompt.add_bos))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        whole = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=12, temperature=0
        )
        stream = await client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content


async def test_stop_strings_never_leak(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        free = await client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=40, temperature=0
        )
        text = free.choices[0].text
        assert len(text) > 6
        # A stop string that straddles tokens: take a slice from the middle.
        stop = text[3:6]
        expected = text[: text.index(stop)]
        cut = await client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=40, temperature=0, stop=[stop, "zzzz"]
        )
        assert cut.choices[0].text == expected
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].model_extra["stop_sequence"] == stop
        stream = await client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=40, temperature=0, stop=stop, stream=True
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_completions_prompt_shapes(client: openai.AsyncOpenAI, neuron: NeuronHandle) -> None:
    model = neuron.neuron.manager.slots["tiny"].model
    tokens = model.tokenize("Hello there")
    with trio.fail_after(30):
        by_text = await client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=6, temperature=0
        )
        by_tokens = await client.completions.create(
            model="tiny", prompt=tokens, max_tokens=6, temperature=0
        )
        several = await client.completions.create(
            model="tiny", prompt=["Hello there", "Other"], max_tokens=6, temperature=0
        )
    assert by_text.choices[0].text == by_tokens.choices[0].text
    assert by_text.usage.prompt_tokens == len(tokens)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == by_text.choices[0].text
    assert several.usage.completion_tokens == 12


async def test_greedy_matches_llama_cpp_python(
    client: openai.AsyncOpenAI, tiny_model_path: Path
) -> None:
    from llama_cpp import Llama

    def direct() -> str:
        llama = Llama(model_path=str(tiny_model_path), n_ctx=512, n_threads=1, verbose=False)
        try:
            return llama.create_completion("The quick brown", max_tokens=48, temperature=0)[
                "choices"
            ][0]["text"]
        finally:
            llama.close()

    expected = await trio.to_thread.run_sync(direct)
    with trio.fail_after(30):
        reply = await client.completions.create(
            model="tiny", prompt="The quick brown", max_tokens=48, temperature=0
        )
    assert reply.choices[0].text == expected


async def test_max_tokens_clamped_to_context(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(60):
        reply = await client.completions.create(
            model="tiny", prompt="Hi", max_tokens=100_000, temperature=0
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 512


async def test_responses(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        whole = await client.responses.create(
            model="tiny",
            input="Tell me",
            instructions="Be brief.",
            max_output_tokens=10,
            temperature=0,
        )
        assert whole.status == "incomplete"
        assert whole.incomplete_details.reason == "max_output_tokens"
        assert whole.usage.output_tokens == 10
        stream = await client.responses.create(
            model="tiny",
            input="Tell me",
            instructions="Be brief.",
            max_output_tokens=10,
            temperature=0,
            stream=True,
        )
        events = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert "".join(deltas) == whole.output_text == final.output_text


async def test_responses_echo_what_was_asked_and_what_was_used(
    client: openai.AsyncOpenAI,
) -> None:
    with trio.fail_after(30):
        plain = await client.responses.create(model="tiny", input="Hi", max_output_tokens=2)
        asked = await client.responses.create(
            model="tiny",
            input="Hi",
            max_output_tokens=2,
            temperature=0,
            top_p=0.5,
            user="u-7",
            text={"format": {"type": "json_object"}},
        )
    # OpenAI's defaults, which are what the neuron sampled with.
    assert (plain.temperature, plain.top_p) == (1.0, 1.0)
    assert plain.text.format.type == "text" and plain.user is None
    assert plain.background is False and plain.max_tool_calls is None
    assert (asked.temperature, asked.top_p, asked.user) == (0.0, 0.5, "u-7")
    assert asked.text.format.type == "json_object"


@pytest.mark.parametrize(
    "extra, param, match",
    [
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "not stored"),
        ({"background": True}, "background", "synchronously"),
        ({"top_logprobs": 2}, "top_logprobs", "top_logprobs is not supported"),
        ({"include": ["message.output_text.logprobs"]}, "include", "logprobs is not supported"),
        ({"max_tool_calls": -1}, "max_tool_calls", "at least 0"),
    ],
)
async def test_responses_refuse_what_no_engine_honours(
    client: openai.AsyncOpenAI, extra: dict, param: str, match: str
) -> None:
    with trio.fail_after(30):
        with pytest.raises(openai.BadRequestError, match=match) as refused:
            await client.responses.create(model="tiny", input="Hi", **extra)
        assert refused.value.body["param"] == param
        # What a client sends routinely is no refusal.
        await client.responses.create(
            model="tiny",
            input="Hi",
            max_output_tokens=1,
            background=False,
            top_logprobs=0,
            include=["reasoning.encrypted_content"],
        )


async def test_errors_in_openai_envelope(
    http: httpx.AsyncClient, client: openai.AsyncOpenAI
) -> None:
    with trio.fail_after(30):
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nope", messages=CHAT)
        assert missing.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=[])
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=CHAT, n=2)
        not_json = await http.post("/v1/chat/completions", content=b"{nope")
        assert not_json.status_code == 400
        assert not_json.json()["error"]["type"] == "invalid_request_error"
        route = await http.get("/v1/nothing-here")
        assert route.status_code == 404 and "error" in route.json()
        with pytest.raises(openai.BadRequestError) as overflow:
            await client.completions.create(model="tiny", prompt=list(range(5, 600)), max_tokens=1)
        assert overflow.value.body["code"] == "context_length_exceeded"
        assert overflow.value.body["message"].startswith("This model's maximum context length is ")


async def test_chat_without_template(no_template_model_path: Path) -> None:
    async with running_neuron([("raw", str(no_template_model_path))]) as handle:
        async with openai.AsyncOpenAI(
            base_url=handle.url + "/v1", api_key="x", max_retries=0
        ) as client:
            with trio.fail_after(30):
                with pytest.raises(openai.BadRequestError) as missing:
                    await client.chat.completions.create(model="raw", messages=CHAT)
                assert missing.value.body["code"] == "chat_template_missing"
                reply = await client.completions.create(model="raw", prompt="Hi", max_tokens=3)
                assert reply.choices[0].text is not None


async def test_disconnect_frees_the_model(neuron: NeuronHandle, http: httpx.AsyncClient) -> None:
    worker = neuron.neuron.manager.slots["tiny"].worker
    before = worker.statistics().tokens_generated
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 400, "stream": True, "temperature": 0}
    with trio.fail_after(30):
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break
        # The worker notices within a token or two; wait on its state, not a clock.
        while worker.statistics().in_flight:  # noqa: ASYNC110 (state, not an event)
            await trio.sleep(0.005)
    generated = worker.statistics().tokens_generated - before
    assert generated < 100


async def test_token_ids_the_model_does_not_have_are_400(http: httpx.AsyncClient) -> None:
    # The engine sees the vocabulary only when it starts: its refusal must
    # still be a 400, not a 500 nor a 200 stream that ends in an error.
    with trio.fail_after(30):
        for stream in (False, True):
            body = {"model": "tiny", "prompt": [1, 99999], "max_tokens": 4, "stream": stream}
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "prompt" and "token ids" in error["message"]
        ok = await http.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2]})
        assert ok.status_code == 200


async def test_tokens_of_a_stream_the_client_left_are_counted(
    neuron: NeuronHandle, http: httpx.AsyncClient
) -> None:
    worker = neuron.neuron.manager.slots["tiny"].worker
    registry = neuron.neuron.metrics.registry

    def counted(name: str) -> float:
        return registry.get_sample_value(name, {"model": "tiny"}) or 0.0

    before = worker.statistics().tokens_generated
    counted_before = counted("cortex_neuron_tokens_generated_total")
    prompt_before = counted("cortex_neuron_prompt_tokens_total")
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 400, "stream": True}
    with trio.fail_after(30):
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break
        while worker.statistics().in_flight:  # noqa: ASYNC110 (state, not an event)
            await trio.sleep(0.005)
    generated = worker.statistics().tokens_generated - before
    assert generated > 0
    assert counted("cortex_neuron_tokens_generated_total") - counted_before == generated
    assert counted("cortex_neuron_prompt_tokens_total") > prompt_before


async def test_concurrent_requests_and_two_models(
    neuron: NeuronHandle, client: openai.AsyncOpenAI, tiny_model_factory
) -> None:
    other = tiny_model_factory("second.gguf", seed=3, n_embd=32)
    await neuron.neuron.manager.load(
        LoadRequest(model_id="second", source=str(other), options={"n_threads": 1})
    )
    replies: dict[tuple[str, int], str] = {}

    async def ask(model: str, i: int) -> None:
        reply = await client.completions.create(
            model=model, prompt="Same prompt", max_tokens=10, temperature=0
        )
        replies[(model, i)] = reply.choices[0].text

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(ask, "tiny", i)
                nursery.start_soon(ask, "second", i)
    assert len({replies[("tiny", i)] for i in range(4)}) == 1
    assert len({replies[("second", i)] for i in range(4)}) == 1
    assert replies[("tiny", 0)] != replies[("second", 0)]


async def test_default_max_tokens_caps_requests_that_name_none(tiny_model_path: Path) -> None:
    with trio.fail_after(30):
        async with running_neuron([("tiny", str(tiny_model_path))], default_max_tokens=7) as handle:
            client = openai.AsyncOpenAI(base_url=handle.url + "/v1", api_key="none")
            reply = await client.chat.completions.create(model="tiny", messages=CHAT)
            assert reply.usage.completion_tokens == 7
            assert reply.choices[0].finish_reason == "length"
            reply = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=11)
            assert reply.usage.completion_tokens == 11
            reply = await client.responses.create(model="tiny", input="Hello")
            assert reply.usage.output_tokens == 7 and reply.status == "incomplete"


async def test_queue_limit(tmp_path: Path) -> None:
    # One sequence at a time: a second request would have to wait (see
    # test_batching.py for the queue in front of several slots). A slow fake
    # engine: a real tiny model can finish a whole reply into the socket's
    # buffers before the second request arrives.
    source = tmp_path / "slow.fake"
    source.write_text("fake")
    engine = FakeEngine(reply=lambda prompt: "x" * 10_000, token_delay=0.01, parallel=1)
    async with running_neuron([("tiny", str(source))], plugins=[engine], queue_limit=0) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            body = {"model": "tiny", "prompt": "Go", "max_tokens": 3000, "stream": True}
            with trio.fail_after(30):
                async with http.stream("POST", "/v1/completions", json=body) as first:
                    async for _ in first.aiter_lines():
                        break
                    second = await http.post("/v1/completions", json=body)
    assert second.status_code == 429
    assert second.headers["retry-after"]
    assert second.json()["error"]["type"] == "rate_limit_error"
    message = second.json()["error"]["message"]
    assert message == "the queue for model 'tiny' is full (0 waiting); retry later"


async def test_metrics(
    neuron: NeuronHandle, client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(30):
        await client.completions.create(model="tiny", prompt="Hi", max_tokens=5)
        text = (await http.get("/metrics")).text
    assert 'cortex_neuron_tokens_generated_total{model="tiny"} 5.0' in text
    assert "cortex_neuron_time_to_first_token_seconds_bucket" in text
    assert 'cortex_neuron_queue_depth{model="tiny"} 0.0' in text
    assert "cortex_neuron_loaded_models 1.0" in text


async def test_token_required_when_set(tiny_model_path: Path) -> None:
    async with running_neuron([("tiny", str(tiny_model_path))], token="s3cret") as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(30):
                assert (await http.get("/models")).status_code == 401
                assert (await http.get("/health")).status_code == 200
                ok = await http.get("/models", headers={"Authorization": "Bearer s3cret"})
                assert ok.status_code == 200
                wrong = await http.get("/models", headers={"Authorization": "Bearer nope"})
                assert wrong.json()["error"]["type"] == "invalid_request_error"


def test_load_request_validation() -> None:
    from cortex.errors import InvalidRequest

    assert LoadRequest.from_json({"model_id": "a/b"}).source == "a/b"
    for bad in (
        [],
        {"model_id": ""},
        {"model_id": "a", "devices": [-1]},
        {"model_id": "a", "x": 1},
    ):
        with pytest.raises(InvalidRequest):
            LoadRequest.from_json(bad)
    assert (
        json.dumps(LoadRequest.from_json({"model_id": "a", "devices": [0, 1]}).devices) == "[0, 1]"
    )


#: About 1,900 SmolLM2 tokens: seconds of prompt processing on one thread.
LONG_PROMPT = " ".join(["apple river stone blue seven quick moon table"] * 240)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_during_the_prompt_frees_its_slot(
    smollm2_path: Path, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Real weights: a tiny model evaluates any prompt it can hold in
    # milliseconds, before a client could leave.
    caplog.set_level(logging.INFO, logger="cortex.neuron")
    options = {"n_threads": 1, "n_ctx": 2048, "n_batch": 64}
    async with running_neuron([("smollm2", str(smollm2_path))], options=options) as neuron:
        slot = neuron.neuron.manager.slots["smollm2"]
        decoder = slot.model._decoder
        registry = neuron.neuron.metrics.registry

        def counted() -> float:
            name = "cortex_neuron_prompt_tokens_total"
            return registry.get_sample_value(name, {"model": "smollm2"}) or 0.0

        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 20,
            "stream": stream,
        }
        before = decoder.statistics().prompt_tokens
        counted_before = counted()
        async with httpx.AsyncClient(base_url=neuron.url, timeout=120) as http:
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:

                    async def leave_early() -> None:
                        await http.post("/v1/chat/completions", json=body)
                        raise AssertionError("the whole prompt was evaluated")

                    nursery.start_soon(leave_early)
                    # The client leaves once the prompt is under way.
                    while decoder.statistics().prompt_tokens - before < 128:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
                left = trio.current_time()
                while slot.worker.statistics().in_flight:  # noqa: ASYNC110 (state, not an event)
                    await trio.sleep(0.01)
                # Within a chunk of 64 tokens or so, not the whole prompt.
                assert trio.current_time() - left < 5
                # Logged, though the answer never began.
                assert "POST /v1/chat/completions 499" in caplog.text
                evaluated = decoder.statistics().prompt_tokens - before
                assert evaluated < 1000
                assert decoder.statistics().active == 0
                assert counted() - counted_before < 1000
                reply = await http.post(
                    "/v1/chat/completions",
                    json={"model": "smollm2", "messages": CHAT, "max_tokens": 3},
                )
                assert reply.status_code == 200, reply.text


def test_a_character_cut_at_the_end_of_output_is_dropped() -> None:
    from cortex.neuron.stops import StopScanner

    cat = "\u304f".encode()  # three bytes
    scanner = StopScanner()
    assert scanner.feed(cat) == "\u304f"
    assert scanner.feed(cat[:2]) == ""
    assert scanner.flush() == ""
    # Bytes that can never be UTF-8 are still replaced where they stand.
    scanner = StopScanner(["END"])
    assert scanner.feed(b"a\xffb") == "a\ufffdb"
    assert scanner.feed(b"EN") == ""
    assert scanner.flush() == "EN"
