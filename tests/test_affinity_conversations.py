"""Conversations that send no session key, recognised by their prompts and weighed.

The affinity's bookkeeping over chat bodies rendered as a client sends them
(``prompt_of``), its eviction cost against a keyed session's, and its bounds.
``tests/test_follow_ups.py`` replays the agents workload without keys with
conversations recognised, against follow-ups alone.
"""

from __future__ import annotations

import json
import math

import pytest

from cortex.config import CatalogModel
from cortex.gateway import affinity as affinity_module
from cortex.gateway.affinity import BYTES_PER_TOKEN, Prompt, prompt_of
from cortex.gateway.scheduler import FollowUps, Observations, least_shared
from tests.test_cache_eviction import build, caching
from tests.test_scheduling import GIB, gpu

#: trio time of the decisions here.
T = 1000.0

AGENT = CatalogModel(id="agent", vram_mb=8 * GIB)

#: Sessions of one kind share it: about half of a first prompt.
SYSTEM = ("You are a coding agent. " * 500)[:12_000]


def text(name: str, size: int) -> str:
    return (f"{name} " * size)[:size]


def chat(messages: list[dict[str, str]], turn: int) -> bytes:
    """A chat body as a client sends it: the tools and settings after the messages change."""
    tools = [{"name": f"tool-{n}", "description": text(f"t{turn}", 300)} for n in range(5)]
    body = {"model": "agent", "messages": messages, "tools": tools, "temperature": 0.1 * turn}
    return json.dumps(body).encode()


def opening(name: str, document: int = 6_000) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": text(f"document-{name}", document)},
    ]


def turn(messages: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """``messages`` with the model's answer and a tool's result after."""
    return [
        *messages,
        {"role": "assistant", "content": text(f"answer-{n}", 600)},
        {"role": "tool", "content": text(f"result-{n}", 1_200)},
    ]


def keyless(messages: list[dict[str, str]], n: int) -> Prompt:
    return prompt_of(chat(messages, n), None)


def test_the_turns_of_a_keyless_conversation_weigh_as_a_keyed_sessions_do() -> None:
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    _, affinity, clock = build(a, models=[AGENT])
    k = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    _, keyed, keyed_clock = build(k, models=[AGENT])
    messages = opening("1")
    first = keyless(messages, 0)
    second = keyless(turn(messages, 1), 1)
    # The tools after the messages changed: the last prompt is no prefix
    # of the next, but the next holds more than ``least_shared`` of its blocks.
    assert first.blocks[-1] not in second.blocks
    assert (
        first.blocks[: least_shared(len(first.blocks))]
        == second.blocks[: least_shared(len(first.blocks))]
    )
    for sent, gap in ((first, 0.0), (second, 20.0)):
        clock.now += gap
        keyed_clock.now += gap
        affinity.routed("agent", sent, "a")
        keyed.routed("agent", Prompt(session="s1", blocks=(), size=sent.size), "a")
        # Its replica is expected to hold the whole last prompt, as a keyed
        # session's is, not only the blocks the prefix index shares.
        assert affinity.cached("agent", second)["a"] == min(sent.size, second.size)
        assert affinity.remembered("agent", second) == {"a"}
    assert affinity.statistics().sessions == affinity.statistics().conversations == 1
    clock.now += 40
    keyed_clock.now += 40
    cost = affinity.eviction_cost(a, "agent")
    # The turn gap (20 s) is learned as a session's: a scale of three gaps.
    rate = affinity.prefill_seconds(a, "agent", 1.0)
    assert cost == pytest.approx(second.size / BYTES_PER_TOKEN * rate * math.exp(-40 / 60))
    assert cost == pytest.approx(keyed.eviction_cost(k, "agent"))
    # With ``conversations`` off, the prefix index alone knows it: nothing weighed.
    off = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    _, blind, _ = build(off, models=[AGENT], conversations=False)
    blind.routed("agent", first, "a")
    assert blind.cached("agent", second)["a"] < first.size
    blind.routed("agent", second, "a")
    assert blind.statistics().sessions == 0
    assert blind.eviction_cost(off, "agent") == 0.0


@pytest.mark.parametrize("document", [6_000, 300])
def test_two_sessions_sharing_a_system_prompt_stay_two(document: int) -> None:
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    _, affinity, clock = build(a, models=[AGENT])
    one, two = opening("1", document), opening("2", document)
    first = keyless(one, 0)
    other = keyless(two, 0)
    # They share the system prompt's blocks: half their first prompts, or
    # more than three quarters (a share alone would take them for one).
    pairs = zip(first.blocks, other.blocks, strict=False)
    shared = next(n for n, (x, y) in enumerate(pairs) if x != y)
    assert shared == len(SYSTEM) // 2048
    assert (shared >= least_shared(len(first.blocks))) == (document < 1_000)
    # What tells them apart: the blocks of their messages, the document's included.
    assert first.messages is not None and shared < first.repeated
    affinity.routed("agent", first, "a")
    affinity.routed("agent", other, "a")
    assert affinity.statistics().conversations == 2
    # Each next turn continues its own.
    one, two = turn(one, 1), turn(two, 1)
    assert affinity.conversation("agent", keyless(one, 1).blocks) != affinity.conversation(
        "agent", keyless(two, 1).blocks
    )
    affinity.routed("agent", keyless(one, 1), "a")
    affinity.routed("agent", keyless(two, 1), "a")
    assert affinity.statistics().conversations == 2
    clock.now += 30
    tokens = (keyless(one, 1).size + keyless(two, 1).size) / BYTES_PER_TOKEN
    assert affinity.eviction_cost(a, "agent") == pytest.approx(
        affinity.prefill_seconds(a, "agent", tokens) * math.exp(-30 / 30)
    )
    # A third session's first turn continues neither.
    assert affinity.conversation("agent", keyless(opening("3"), 0).blocks) is None


def test_a_conversation_moved_to_another_replica_leaves_the_first() -> None:
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    b = caching(gpu("b", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    _, affinity, _ = build(a, b, models=[AGENT])
    messages = opening("1")
    affinity.routed("agent", keyless(messages, 0), "a")
    assert affinity.eviction_cost(a, "agent") > 0
    messages = turn(messages, 1)
    affinity.routed("agent", keyless(messages, 1), "b")
    assert affinity.eviction_cost(a, "agent") == 0.0
    assert affinity.eviction_cost(b, "agent") == pytest.approx(
        affinity.prefill_seconds(b, "agent", keyless(messages, 1).size / BYTES_PER_TOKEN)
    )
    # Unloaded there, it is forgotten, and its next turn starts a new one.
    affinity.forget("b", "agent")
    assert affinity.statistics().conversations == affinity.statistics().sessions == 0
    assert affinity.conversation("agent", keyless(turn(messages, 2), 2).blocks) is None


def test_a_keyless_follow_up_counts_its_conversation_once_in_full() -> None:
    a = caching(gpu("a", 16 * GIB, ("agent", 8 * GIB, 100)), "agent")
    p, affinity, clock = build(a, models=[AGENT])
    follow_ups = p.predictor.follow_ups
    assert follow_ups is not None
    sent = keyless(opening("1"), 0)
    affinity.routed("agent", sent, "a")
    clock.now += 100
    full = affinity.prefill_seconds(a, "agent", sent.size / BYTES_PER_TOKEN)
    assert p.predictor.cache_cost(a, "agent", T) == pytest.approx(full * math.exp(-100 / 30))
    follow_ups.expect("a", "agent", sent, T - 1)
    # Its tool's result is coming: its prompt in full, not in full and weighed again.
    assert p.predictor.cache_cost(a, "agent", T) == pytest.approx(full)


def test_conversations_are_bounded_with_the_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(affinity_module, "MAX_SESSIONS", 4)
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    _, affinity, _ = build(a, models=[AGENT])
    affinity.routed("agent", Prompt(session="keyed", blocks=(), size=8_000), "a")
    sent = [keyless(opening(str(n)), 0) for n in range(10)]
    for prompt in sent:
        affinity.routed("agent", prompt, "a")
    stats = affinity.statistics()
    assert stats.sessions == stats.conversations == 4
    assert len(affinity._marks) == 4
    # The oldest are gone, their marks with them; the newest are known.
    assert affinity.conversation("agent", sent[0].blocks) is None
    assert affinity.conversation("agent", sent[-1].blocks) is not None
    rate = affinity.prefill_seconds(a, "agent", 1.0)
    tokens = sum(p.size for p in sent[-4:]) / BYTES_PER_TOKEN
    assert affinity.eviction_cost(a, "agent") == pytest.approx(tokens * rate)


def test_where_the_messages_end_is_what_a_next_turn_repeats() -> None:
    messages = opening("1")
    first = keyless(messages, 0)
    content = chat(messages, 0)
    end = content.index(b'"tools"') - len(b", ")  # past the messages' closing bracket
    start = content.index(b'"messages"')
    assert first.messages == (end - 1 - start) // 2048 == first.repeated
    # Tools after the messages a quarter of the prompt or more: a share of
    # blocks would miss the next turn; the messages do not.
    tools = [{"role": "tool-spec", "content": text("spec", 9_000)}]
    long = prompt_of(json.dumps({"messages": messages, "tools": tools}).encode(), None)
    nxt = turn(messages, 1)
    after = prompt_of(json.dumps({"messages": nxt, "tools": tools + tools}).encode(), None)
    pairs = zip(long.blocks, after.blocks, strict=False)
    shared = next(n for n, (x, y) in enumerate(pairs) if x != y)
    assert long.repeated <= shared < least_shared(len(long.blocks))
    follow_ups = FollowUps(Observations())
    follow_ups.expect("a", "agent", long, T)
    assert follow_ups.arrived("agent", after, T + 1, lambda _: True) == "kept"
    # Unknown (not JSON, or a keyed prompt, which needs none): the share.
    assert prompt_of(b'"messages": "' + bytes(range(256)) * 40, None).messages is None
    assert prompt_of(content, "key").messages is None
    keyed = prompt_of(content, "key")
    assert keyed.repeated == least_shared(len(keyed.blocks))
    # Messages past the blocks indexed hold them all.
    huge = prompt_of(chat([{"role": "user", "content": "x" * 600_000}], 0), None)
    assert huge.messages == len(huge.blocks) == 256
