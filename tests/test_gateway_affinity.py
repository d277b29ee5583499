"""Session affinity: a session or a prefix stays on its replica until that one is saturated."""

from __future__ import annotations

import json
import re
from typing import Any

import trio

from cortex.config import CatalogModel
from cortex.gateway.affinity import BLOCK_BYTES, prompt_of, session_key
from cortex.gateway.proxy import cached_tokens
from tests.gateway_helpers import FakeNeuron, Fleet, catalogue, running_fleet

MODEL = "org/small"
MODELS = catalogue(CatalogModel(id=MODEL, vram_mb=100))
ANTHROPIC = {"anthropic-version": "2023-06-01"}


def two_replicas() -> tuple[FakeNeuron, FakeNeuron]:
    return FakeNeuron("a", preload=[MODEL]), FakeNeuron("b", preload=[MODEL])


class Order:
    """Numbers the requests the fakes get, across fakes (``served`` sorts by them)."""

    def __init__(self, *fakes: FakeNeuron) -> None:
        self.fakes = fakes
        self.stamps: dict[tuple[str, int], int] = {}

    def stamp(self, fleet: Fleet) -> None:
        for fake in self.fakes:
            for n in range(len(fake.requests)):
                self.stamps.setdefault((fake.name, n), len(self.stamps))


def served(order: Order, marker: str) -> list[str]:
    """The neurons that got a request mentioning ``marker``, in the order they got them."""
    found = []
    for fake in order.fakes:
        for n, (path, body, _) in enumerate(fake.requests):
            if path != "/tokenize" and marker in json.dumps(body):
                found.append((order.stamps[fake.name, n], fake.name))
    return [name for _, name in sorted(found)]


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not wanted and line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def metrics_text(fleet: Fleet) -> str:
    return (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text


async def wait_requests(fleet: Fleet, count: int) -> None:
    # The fakes' request_arrived is set once: poll their request lists instead.
    while sum(len(f.requests) for f in fleet.fakes.values()) < count:  # noqa: ASYNC110
        await trio.sleep(0.01)


def anthropic_turn(session: str, turns: list[str]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for n, text in enumerate(turns):
        if n:
            messages.append({"role": "assistant", "content": "ok"})
        messages.append({"role": "user", "content": text})
    return {
        "model": MODEL,
        "max_tokens": 50,
        "system": [{"type": "text", "text": "You are a helper."}],
        "messages": messages,
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": session})},
    }


def chat_turn(turns: list[str], **extra: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for n, text in enumerate(turns):
        if n:
            messages.append({"role": "assistant", "content": "ok"})
        messages.append({"role": "user", "content": text})
    return {"model": MODEL, "messages": messages, **extra}


async def first_turns_apart(fleet: Fleet, order: Order, *sends: Any) -> None:
    """Send each first turn while the ones before it are held: each takes a free replica."""
    hold = trio.Event()
    for fake in fleet.fakes.values():
        fake.hold = hold
    async with trio.open_nursery() as nursery:
        for n, send in enumerate(sends, 1):
            nursery.start_soon(send)
            await wait_requests(fleet, n)
            order.stamp(fleet)
        hold.set()
    for fake in fleet.fakes.values():
        fake.hold = None


async def test_a_session_stays_on_its_replica_across_turns() -> None:
    a, b = two_replicas()
    order = Order(a, b)
    with trio.fail_after(20):
        async with running_fleet([a, b], MODELS) as fleet:

            async def claude(turns: list[str]) -> None:
                headers = {**ANTHROPIC, "x-claude-code-session-id": "session-s"}
                body = anthropic_turn("session-s", turns)
                response = await fleet.client.post("/v1/messages", json=body, headers=headers)
                assert response.status_code == 200, response.text

            async def openai(turns: list[str]) -> None:
                body = chat_turn(turns, prompt_cache_key="session-t")
                response = await fleet.client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text

            s, t = ["s-one"], ["t-one"]
            await first_turns_apart(fleet, order, lambda: claude(s), lambda: openai(t))
            for n in range(3):
                s, t = [*s, f"s-more-{n}"], [*t, f"t-more-{n}"]
                await openai(t)
                order.stamp(fleet)
                await claude(s)
                order.stamp(fleet)
            on_s, on_t = served(order, "s-one"), served(order, "t-one")
            assert len(on_s) == len(on_t) == 4
            assert len(set(on_s)) == len(set(on_t)) == 1 and on_s[0] != on_t[0]
            text = await metrics_text(fleet)
            assert metric(text, "cortex_affinity_total", result="new") == 2
            assert metric(text, "cortex_affinity_total", result="kept") == 6
            assert metric(text, "cortex_affinity_total", result="broken") == 0


async def test_a_saturated_replica_breaks_the_affinity() -> None:
    a, b = two_replicas()
    order = Order(a, b)
    with trio.fail_after(20):
        async with running_fleet([a, b], MODELS) as fleet:
            key = {"user": "alice"}
            response = await fleet.client.post(
                "/v1/chat/completions", json=chat_turn(["first"], **key)
            )
            assert response.status_code == 200
            order.stamp(fleet)
            home = served(order, "first")[0]
            hold = trio.Event()
            fleet.fakes[home].hold = hold

            async def second() -> None:
                body = chat_turn(["first", "second"], **key)
                assert (await fleet.client.post("/v1/chat/completions", json=body)).is_success

            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await wait_requests(fleet, 2)
                order.stamp(fleet)
                # Its one slot is taken: the third turn goes to the other replica.
                body = chat_turn(["first", "second", "third"], **key)
                response = await fleet.client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200
                order.stamp(fleet)
                hold.set()
            where = served(order, "first")
            assert where[:2] == [home, home] and where[2] != home
            text = await metrics_text(fleet)
            assert metric(text, "cortex_affinity_total", result="new") == 1
            assert metric(text, "cortex_affinity_total", result="kept") == 1
            assert metric(text, "cortex_affinity_total", result="broken") == 1


async def test_without_a_key_the_prefix_keeps_a_conversation_on_one_replica() -> None:
    a, b = two_replicas()
    order = Order(a, b)
    # Long enough for several blocks of the prefix index, and different from the start.
    p_text = "p-conversation " + "about the first topic " * 400
    q_text = "q-conversation " + "about another subject " * 400
    with trio.fail_after(20):
        async with running_fleet([a, b], MODELS) as fleet:

            async def send(turns: list[str]) -> None:
                body = chat_turn(turns)
                assert (await fleet.client.post("/v1/chat/completions", json=body)).is_success

            p, q = [p_text], [q_text]
            await first_turns_apart(fleet, order, lambda: send(p), lambda: send(q))
            for n in range(3):
                p, q = [*p, f"p-next-{n}"], [*q, f"q-next-{n}"]
                await send(q)
                order.stamp(fleet)
                await send(p)
                order.stamp(fleet)
            on_p, on_q = served(order, "p-conversation"), served(order, "q-conversation")
            assert len(on_p) == len(on_q) == 4
            assert len(set(on_p)) == len(set(on_q)) == 1 and on_p[0] != on_q[0]


async def test_new_sessions_spread_rather_than_queue_behind_a_shared_prefix() -> None:
    # Both replicas have a free slot; the first holds the shared system
    # prompt, but also the first session's whole prompt still to process.
    a, b = (
        FakeNeuron("a", preload=[MODEL], parallel=2),
        FakeNeuron("b", preload=[MODEL], parallel=2),
    )
    order = Order(a, b)
    system = "a shared system prompt for every agent session " * 400
    with trio.fail_after(20):
        async with running_fleet([a, b], MODELS) as fleet:

            async def send(turns: list[str]) -> None:
                body = {"model": MODEL, "messages": [{"role": "system", "content": system}]}
                body["messages"] += chat_turn(turns)["messages"]
                assert (await fleet.client.post("/v1/chat/completions", json=body)).is_success

            p, q = ["p-document " * 300], ["q-document " * 300]
            await first_turns_apart(fleet, order, lambda: send(p), lambda: send(q))
            for n in range(2):
                p, q = [*p, f"p-next-{n}"], [*q, f"q-next-{n}"]
                await send(q)
                order.stamp(fleet)
                await send(p)
                order.stamp(fleet)
            on_p, on_q = served(order, "p-document"), served(order, "q-document")
            assert len(set(on_p)) == len(set(on_q)) == 1 and on_p[0] != on_q[0]
            text = await metrics_text(fleet)
            assert metric(text, "cortex_affinity_total", result="kept") == 4
            # The second session's first turn left the shared prefix's replica.
            assert metric(text, "cortex_affinity_total", result="broken") == 1


async def test_a_long_conversation_waits_for_its_saturated_replica() -> None:
    # Processing its whole prompt elsewhere is predicted to take longer than
    # the slot at home takes to free (unlike the short one above).
    a, b = two_replicas()
    order = Order(a, b)
    long_text = "p-conversation " + "about the first topic " * 2000
    with trio.fail_after(20):
        async with running_fleet([a, b], MODELS) as fleet:

            async def send(turns: list[str]) -> None:
                body = chat_turn(turns)
                assert (await fleet.client.post("/v1/chat/completions", json=body)).is_success

            await send([long_text])
            order.stamp(fleet)
            home = served(order, "p-conversation")[0]
            hold = trio.Event()
            fleet.fakes[home].hold = hold
            async with trio.open_nursery() as nursery:
                # A second request of the conversation takes the one slot ...
                nursery.start_soon(send, [long_text, "second"])
                await wait_requests(fleet, 2)
                order.stamp(fleet)
                # ... and the next waits at the gateway for it, not at the other.
                nursery.start_soon(send, [long_text, "second", "third"])
                while not metric(  # noqa: ASYNC110 (the queue's depth is only in metrics)
                    await metrics_text(fleet), "cortex_gateway_queue_depth", model=MODEL
                ):
                    await trio.sleep(0.01)
                assert sum(len(f.requests) for f in fleet.fakes.values()) == 2
                hold.set()
            order.stamp(fleet)
            assert served(order, "p-conversation") == [home, home, home]
            text = await metrics_text(fleet)
            assert metric(text, "cortex_affinity_total", result="kept") == 2
            assert metric(text, "cortex_affinity_total", result="broken") == 0


def claude_body(billing: str | None) -> dict[str, Any]:
    system = [{"type": "text", "text": "You are Claude Code, a helper.", "cache_control": {}}]
    if billing is not None:
        system.insert(0, {"type": "text", "text": billing})
    return {
        "model": MODEL,
        "max_tokens": 50,
        "system": system,
        "messages": [{"role": "user", "content": "list the files"}],
    }


async def test_the_billing_header_block_never_reaches_the_neuron() -> None:
    a = FakeNeuron("a", preload=[MODEL])
    billing = "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=cli; cch=%s;"
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            counts = []
            for body in (claude_body(None), claude_body(billing % "1a2b"), claude_body(billing)):
                response = await fleet.client.post("/v1/messages", json=body, headers=ANTHROPIC)
                assert response.status_code == 200, response.text
                counts.append(response.json()["usage"]["input_tokens"])
                sent = a.requests[-1][1]["messages"]
                assert sent[0] == {"role": "system", "content": "You are Claude Code, a helper."}
                response = await fleet.client.post(
                    "/v1/messages/count_tokens",
                    json={k: body[k] for k in ("model", "system", "messages")},
                    headers=ANTHROPIC,
                )
                assert response.status_code == 200, response.text
                counts.append(response.json()["input_tokens"])
            assert len(set(counts)) == 1 and counts[0] > 0
            assert not any("billing" in json.dumps(body) for _, body, _ in a.requests)


async def test_unknown_betas_and_head_slash_are_answered() -> None:
    a = FakeNeuron("a", preload=[MODEL])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            head = await fleet.client.head("/")
            assert head.status_code == 200
            headers = {
                **ANTHROPIC,
                "anthropic-beta": "claude-code-20250219,some-future-beta-2099-01-01,x",
                "x-claude-code-session-id": "4f1c3f9e-0000-4000-8000-000000000000",
            }
            body = claude_body(None) | {"stream": True}
            response = await fleet.client.post("/v1/messages?beta=true", json=body, headers=headers)
            assert response.status_code == 200, response.text
            assert "event: message_stop" in response.text


async def test_the_neurons_prompt_cache_figures_are_exported() -> None:
    a = FakeNeuron("a", preload=[MODEL])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            a.loaded[MODEL]["prompt_cache"] = {
                "hits": 3,
                "misses": 1,
                "slot_tokens": 700,
                "host_tokens": 300,
            }
            fleet.state.neurons["a"].poke.set()
            labels = {"model": MODEL, "neuron": "a"}
            while True:
                text = await metrics_text(fleet)
                if metric(text, "cortex_prompt_cache_hit_ratio", **labels) is not None:
                    break
                await trio.sleep(0.02)
            assert metric(text, "cortex_prompt_cache_hit_ratio", **labels) == 0.75
            assert metric(text, "cortex_prompt_cache_reused_tokens", **labels) == 1000


def test_session_keys_in_order_of_preference() -> None:
    claude = {"metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s1"})}}
    assert session_key("from-header", claude) == "from-header"
    assert session_key(None, claude) == "s1"
    assert session_key(None, {"metadata": {"user_id": "user-7"}}) == "user-7"
    assert session_key(None, {"prompt_cache_key": "k", "user": "u"}) == "k"
    assert session_key(None, {"user": "u"}) == "u"
    assert session_key(None, {"messages": []}) is None


def test_prefix_blocks_start_at_the_prompt_and_extend_with_the_conversation() -> None:
    turn = {"messages": [{"role": "user", "content": "x " * 3000}]}
    longer = {"messages": [*turn["messages"], {"role": "user", "content": "y " * 3000}]}
    one = prompt_of(json.dumps({"max_tokens": 5, **turn}).encode(), None)
    two = prompt_of(json.dumps({"max_tokens": 900, **longer}).encode(), None)
    assert len(one.blocks) == one.size // BLOCK_BYTES >= 2
    assert two.blocks[: len(one.blocks)] == one.blocks
    assert re.fullmatch(rb".{8}", one.blocks[0], re.DOTALL)


def test_cached_tokens_from_each_usage() -> None:
    assert cached_tokens({"prompt_tokens_details": {"cached_tokens": 5}}) == 5
    assert cached_tokens({"input_tokens_details": {"cached_tokens": 6}}) == 6
    assert cached_tokens({"cache_read_input_tokens": 7}) == 7
    assert cached_tokens({"prompt_tokens": 3}) == 0
    assert cached_tokens(None) == 0
