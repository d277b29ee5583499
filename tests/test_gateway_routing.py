"""Routing through a real gateway to scripted fake neurons."""

from __future__ import annotations

import trio
import trio.testing

from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

MODELS = catalogue(
    CatalogModel(id="org/small", source="hf:org/small-GGUF", vram_mb=100),
    CatalogModel(
        id="org/tuned",
        source="/models/tuned.gguf",
        harness="llamacpp",
        chat_format="chatml",
        options={"n_ctx": 2048},
        vram_mb=100,
        sampling={"temperature": 0.2, "top_k": 20},
    ),
    aliases={"tier/small": "org/small"},
)


async def test_routes_to_loaded_model() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.chat("org/small")
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["choices"][0]["message"]["content"] == a.reply
            assert body["usage"]["completion_tokens"] == len(a.reply.split())
            assert response.headers["x-request-id"]
            assert a.load_calls == []
            path, _, headers = a.requests[-1]
            assert path == "/v1/chat/completions"
            assert headers["x-request-id"] == response.headers["x-request-id"]


async def test_forwards_request_id_and_token() -> None:
    a = FakeNeuron("a", preload=["org/small"], token="s3cret")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post(
                "/v1/chat/completions",
                json={"model": "org/small", "messages": [{"role": "user", "content": "x"}]},
                headers={"x-request-id": "abc-123"},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == "abc-123"
            assert a.requests[-1][2]["x-request-id"] == "abc-123"
            assert a.requests[-1][2]["authorization"] == "Bearer s3cret"


async def test_alias_is_rewritten_to_the_concrete_id() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.chat("tier/small")
            assert response.status_code == 200, response.text
            assert a.requests[-1][1]["model"] == "org/small"
            assert response.json()["model"] == "org/small"


async def test_catalogue_sampling_fills_what_the_request_leaves_out() -> None:
    a = FakeNeuron("a", preload=["org/tuned"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            assert (await fleet.chat("org/tuned")).status_code == 200
            sent = a.requests[-1][1]
            assert sent["temperature"] == 0.2 and sent["top_k"] == 20
            assert (await fleet.chat("org/tuned", temperature=0.9)).status_code == 200
            sent = a.requests[-1][1]
            assert sent["temperature"] == 0.9 and sent["top_k"] == 20


async def test_default_max_tokens_fills_chat_and_responses_only() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, default_max_tokens=77) as fleet:
            assert (await fleet.chat("org/small")).status_code == 200
            assert a.requests[-1][1]["max_tokens"] == 77
            assert (await fleet.chat("org/small", max_completion_tokens=5)).status_code == 200
            sent = a.requests[-1][1]
            assert sent["max_completion_tokens"] == 5 and "max_tokens" not in sent
            assert (await fleet.chat("org/small", max_tokens=9)).status_code == 200
            assert a.requests[-1][1]["max_tokens"] == 9
            # Completions without max_tokens mean 16 tokens, as OpenAI's: left alone.
            body = {"model": "org/small", "prompt": "hi"}
            await fleet.client.post("/v1/completions", json=body)
            assert "max_tokens" not in a.requests[-1][1]
        b = FakeNeuron("b", preload=["org/small"])
        async with running_fleet([b], MODELS) as fleet:
            assert (await fleet.chat("org/small")).status_code == 200
            assert "max_tokens" not in b.requests[-1][1]  # the neuron's default applies


async def test_prefers_the_least_busy_neuron() -> None:
    hold = trio.Event()
    a = FakeNeuron("a", preload=["org/small"], hold=hold)
    b = FakeNeuron("b", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS) as fleet:
            # Make "a" the most recently used, then hold a request there.
            a.hold = None
            assert (await fleet.chat("org/small")).status_code == 200
            first = "a" if a.requests else "b"
            busy, other = (a, b) if first == "a" else (b, a)
            busy.hold, busy.request_arrived = hold, trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.chat, "org/small")
                await busy.request_arrived.wait()
                before = len(other.requests)
                response = await fleet.chat("org/small")
                assert response.status_code == 200
                assert len(other.requests) == before + 1
                hold.set()


async def test_cold_load_sends_the_catalogue_entry() -> None:
    a = FakeNeuron("a")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.chat("org/tuned")
            assert response.status_code == 200, response.text
            assert a.load_calls == [
                {
                    "model_id": "org/tuned",
                    "source": "/models/tuned.gguf",
                    "harness": "llamacpp",
                    "chat_format": "chatml",
                    "options": {"n_ctx": 2048},
                }
            ]
            # Loaded now: the next request goes straight through.
            assert (await fleet.chat("org/tuned")).status_code == 200
            assert len(a.load_calls) == 1
            assert fleet.state.neurons["a"].models["org/tuned"].status == "loaded"


async def test_concurrent_cold_requests_cause_one_load() -> None:
    gate = trio.Event()
    a = FakeNeuron("a", load_gate=gate)
    results = []

    async def ask(fleet) -> None:
        results.append(await fleet.chat("tier/small"))

    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(ask, fleet)
                await a.load_started.wait()
                # Let every request reach the gateway and wait on the load.
                await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                load = fleet.state.pending[("a", "org/small")]
                assert load.waiters == 3
                gate.set()
            assert [r.status_code for r in results] == [200, 200, 200]
            assert [c["model_id"] for c in a.load_calls] == ["org/small"]


async def test_failed_load_moves_to_the_next_neuron() -> None:
    a = FakeNeuron("a", memory_mb=9000, failing={"org/small"})
    b = FakeNeuron("b", memory_mb=1000)
    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS) as fleet:
            response = await fleet.chat("org/small")
            assert response.status_code == 200, response.text
            assert len(a.load_calls) == 1 and len(b.load_calls) == 1
            assert b.requests[-1][1]["model"] == "org/small"


async def test_load_failing_everywhere_reports_the_neurons_error() -> None:
    a = FakeNeuron("a", failing={"org/small"})
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.chat("org/small")
            assert response.status_code == 502
            assert "corrupt file" in response.json()["error"]["message"]


async def test_requests_move_off_a_neuron_that_went_down() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    b = FakeNeuron("b", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS) as fleet:
            a.shutdown.set()
            # Gone for real: a request must not reach it while it winds down.
            await a.stopped.wait()
            for _ in range(3):
                response = await fleet.chat("org/small")
                assert response.status_code == 200, response.text
            assert all(r[0] != "/v1/chat/completions" for r in a.requests)
            assert len(b.requests) == 3
            await fleet.refresh()
            assert not fleet.state.neurons["a"].up
            health = (await fleet.client.get("/health")).json()
            assert health["status"] == "degraded"
            assert {n["name"]: n["up"] for n in health["neurons"]} == {"a": False, "b": True}


async def test_first_request_after_the_only_holder_died_loads_it_elsewhere() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    b = FakeNeuron("b")
    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS) as fleet:
            a.shutdown.set()
            await a.stopped.wait()
            # No poll has seen it go: the gateway still thinks a has the model.
            response = await fleet.chat("org/small")
            assert response.status_code == 200, response.text
            assert [c["model_id"] for c in b.load_calls] == ["org/small"]


async def test_first_request_after_the_only_holder_died_is_503_with_retry_after() -> None:
    models = catalogue(
        *MODELS.models,
        CatalogModel(id="org/big", vram_mb=5000),
        CatalogModel(id="org/cold", vram_mb=5000),
    )
    a = FakeNeuron("a", preload=["org/big", "extra/model"])
    b = FakeNeuron("b", memory_mb=1000)
    with trio.fail_after(10):
        async with running_fleet([a, b], models) as fleet:
            a.shutdown.set()
            await a.stopped.wait()
            # Loaded there and fits nowhere else; known only from the dead
            # neuron; not loaded, and it would cold-load only there.
            for model in ("org/big", "extra/model", "org/cold"):
                response = await fleet.chat(model)
                assert response.status_code == 503, response.text
                assert int(response.headers["retry-after"]) >= 1
                anthropic = await fleet.client.post(
                    "/v1/messages",
                    json={
                        "model": model,
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                assert anthropic.status_code == 529, anthropic.text
                assert int(anthropic.headers["retry-after"]) >= 1


async def test_model_list() -> None:
    a = FakeNeuron("a", preload=["org/small", "extra/model"], memory_mb=1000)
    b = FakeNeuron("b", memory_mb=50)
    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS) as fleet:
            body = (await fleet.client.get("/v1/models")).json()
            assert body["object"] == "list"
            entries = {m["id"]: m for m in body["data"]}
            assert set(entries) == {"org/small", "org/tuned", "extra/model", "tier/small"}
            small = entries["org/small"]
            assert small["object"] == "model" and small["owned_by"] == "cortex"
            assert small["loaded"] is True and small["status"] == "loaded"
            assert small["locations"] == [{"neuron": "a", "status": "loaded"}]
            assert small["feasible_on"] == ["a"]
            tuned = entries["org/tuned"]
            assert tuned["loaded"] is False and tuned["status"] == "available"
            assert tuned["locations"] == []
            assert entries["extra/model"]["loaded"] is True
            assert entries["extra/model"]["feasible_on"] == []
            alias = entries["tier/small"]
            assert alias["alias_of"] == "org/small" and alias["loaded"] is True
            one = await fleet.client.get("/v1/models/tier/small")
            assert one.json()["alias_of"] == "org/small"


async def test_a_model_that_failed_on_one_neuron_is_available_where_another_can_load_it() -> None:
    """A failed load on one neuron shows there, and hides nothing another neuron can serve."""
    a = FakeNeuron("a", memory_mb=1000)
    b = FakeNeuron("b", memory_mb=1000)
    failed = {"id": "m", "harness": "fake", "status": "failed", "memory_mb": 0, "error": "bad file"}
    a.loaded["m"] = failed
    models = catalogue(CatalogModel(id="m", source="/m.gguf", vram_mb=100))
    with trio.fail_after(10):
        async with running_fleet([a, b], models) as fleet:
            entry = (await fleet.client.get("/v1/models/m")).json()
            assert entry["status"] == "available" and entry["feasible_on"] == ["a", "b"]
            assert entry["locations"] == [{"neuron": "a", "status": "failed"}]
            listed = {m["id"]: m for m in (await fleet.client.get("/v1/models")).json()["data"]}
            assert listed["m"]["status"] == "available"
            # Failed on every neuron it fits on: failed.
            b.loaded["m"] = failed
            await fleet.refresh()
            assert (await fleet.client.get("/v1/models/m")).json()["status"] == "failed"


async def test_model_list_says_each_models_context_length() -> None:
    # Aider (through LiteLLM), IDE plugins (Continue) and vLLM's clients size
    # their prompts by it.
    models = catalogue(
        *MODELS.models,
        CatalogModel(id="org/unsized", source="hf:org/unsized-GGUF", vram_mb=100),
        aliases={"tier/small": "org/small"},
    )
    a = FakeNeuron("a", preload=["org/small", "extra/model"])
    b = FakeNeuron("b", preload=["org/small"])
    a.loaded["org/small"]["n_ctx"] = 8192
    b.loaded["org/small"]["n_ctx"] = 4096
    with trio.fail_after(10):
        async with running_fleet([a, b], models) as fleet:
            body = (await fleet.client.get("/v1/models")).json()
            one = (await fleet.client.get("/v1/models/org/tuned")).json()
            pages = await fleet.client.get(
                "/v1/models", headers={"anthropic-version": "2023-06-01"}
            )
    entries = {m["id"]: m for m in body["data"]}
    contexts = {
        model_id: (entry.get("context_length"), entry.get("max_model_len"))
        for model_id, entry in entries.items()
    }
    assert contexts == {
        "org/small": (4096, 4096),  # the smallest of its replicas'
        "extra/model": (4096, 4096),  # as its neuron reports it
        "org/tuned": (2048, 2048),  # not loaded: its entry's options.n_ctx
        "org/unsized": (None, None),  # unknown: no neuron runs it, no n_ctx in its entry
        "tier/small": (4096, 4096),
    }
    assert "context_length" not in entries["org/unsized"]
    assert one["context_length"] == one["max_model_len"] == 2048
    anthropic = {m["id"]: m for m in pages.json()["data"]}
    assert anthropic["org/small"]["type"] == "model"
    assert anthropic["org/small"]["context_length"] == 4096
    # Where Anthropic's SDK reads it (ModelInfo.max_input_tokens).
    assert anthropic["org/small"]["max_input_tokens"] == 4096
    assert "max_input_tokens" not in anthropic["org/unsized"]
