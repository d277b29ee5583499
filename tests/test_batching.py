"""Continuous batching: the llama.cpp engine's decoder and the neuron's worker.

On tiny F32 models the logits do not depend on what else is in a batch (the
margins between candidates dwarf the rounding), so a sequence decoded among
others must give exactly what it gives alone; a sequence that saw another's
cells, another's logits or a stale cache would not.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from cortex.errors import QueueFull
from cortex.harness import Sampling
from cortex.neuron.workers import GenerationRequest, GenerationWorker, Job, collect
from cortex.testing import FakeEngine, FakeModel
from cortex_llamacpp.batched import _Sequence
from tests.neuron_helpers import running_neuron

GREEDY = Sampling(temperature=0.0)
PROMPTS = [
    "The quick brown",
    "Once upon a time",
    "Hello there",
    "abc def",
    "x",
    "Zebra crossing",
    "12345",
    "What is the",
]


#: Both KV layouts: a unified pool, and one stream per slot (what
#: ``kv_unified = "auto"`` takes where it fits; no budget here, so it does).
LAYOUTS = pytest.mark.parametrize("kv_unified", [True, "auto"], ids=["unified", "per-slot"])


def laid_out(model, kv_unified) -> object:
    """``model``, checked to have the layout ``kv_unified`` asked for."""
    assert model.kv_layout == ("unified" if kv_unified is True else "per-slot")
    return model


def text(model, prompt: str, n: int, sampling: Sampling = GREEDY) -> str:
    out = []
    iterator = model.generate(model.tokenize(prompt), sampling)
    try:
        for token in iterator:
            out.append(token.piece)
            if len(out) == n:
                break
    finally:
        iterator.close()
    return b"".join(out).decode()


def concurrently(model, work: list[tuple[str, int, Sampling]]) -> list[str]:
    """Run every (prompt, n, sampling) in its own thread at once."""
    results: list[str | None] = [None] * len(work)
    barrier = threading.Barrier(len(work))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = text(model, *work[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def test_same_workload_twice_gives_the_same_texts(load, tiny_model_path):
    model = load(tiny_model_path, parallel=4)
    work = [
        (prompt, 20 + 7 * i, GREEDY if i % 2 else Sampling(temperature=0.9, seed=i))
        for i, prompt in enumerate(PROMPTS)
    ]
    first = concurrently(model, work)
    assert concurrently(model, work) == first
    assert len(set(first)) == len(first)


@LAYOUTS
def test_eight_prompts_continue_their_own(load, tiny_model_path, kv_unified):
    # The reference is llama-cpp-python's own single-sequence path.
    alone = load(tiny_model_path, parallel=1)
    batched = laid_out(load(tiny_model_path, parallel=8, kv_unified=kv_unified), kv_unified)
    expected = [text(alone, prompt, 40) for prompt in PROMPTS]
    assert len(set(expected)) == len(PROMPTS)  # the continuation depends on the prompt
    assert concurrently(batched, [(p, 40, GREEDY) for p in PROMPTS]) == expected
    stats = batched._decoder.statistics()
    assert stats.max_batch >= 8  # they were decoded together
    assert stats.active == 0


@LAYOUTS
def test_reused_slot_gives_what_a_fresh_model_gives(load, tiny_model_path, kv_unified):
    fresh = load(tiny_model_path, parallel=2)
    expected = {prompt: text(fresh, prompt, 30) for prompt in PROMPTS[:3]}
    seeded = Sampling(temperature=0.8, seed=5)
    expected_seeded = text(fresh, PROMPTS[3], 30, seeded)

    model = laid_out(load(tiny_model_path, parallel=2, kv_unified=kv_unified), kv_unified)
    # Fill both slots with sequences cut short (cancelled) and finished ones.
    assert concurrently(model, [(PROMPTS[4], 3, GREEDY), (PROMPTS[5], 50, GREEDY)])
    assert text(model, PROMPTS[6], 7) and text(model, PROMPTS[7], 60)
    for prompt, want in expected.items():
        assert text(model, prompt, 30) == want
    assert text(model, PROMPTS[3], 30, seeded) == expected_seeded

    # A prompt that extends a cached one reuses its cells, with the same result.
    before = model._decoder.statistics().prompt_cache.slot_tokens
    longer = PROMPTS[0] + " fox"
    assert text(model, longer, 30) == text(fresh, longer, 30)
    assert model._decoder.statistics().prompt_cache.slot_tokens > before


@LAYOUTS
def test_cancelled_sequence_leaves_the_others_intact(load, tiny_model_path, kv_unified):
    alone = load(tiny_model_path, parallel=1)
    model = laid_out(load(tiny_model_path, parallel=4, kv_unified=kv_unified), kv_unified)
    expected = [text(alone, prompt, 60) for prompt in PROMPTS[:4]]
    results: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        barrier.wait()
        # The first consumer walks away after 5 tokens, mid-way.
        results[i] = text(model, PROMPTS[i], 5 if i == 0 else 60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results[0] == expected[0][: len(results[0])]
    assert [results[i] for i in (1, 2, 3)] == expected[1:]
    assert model._decoder.statistics().active == 0


@LAYOUTS
def test_long_prompt_is_chunked_between_the_others_steps(load, tiny_model_factory, kv_unified):
    path = tiny_model_factory(n_ctx=1024)
    alone = load(path, parallel=1)
    model = laid_out(load(path, parallel=4, prompt_chunk=32, kv_unified=kv_unified), kv_unified)
    long_prompt = " ".join(f"word{i}" for i in range(120))
    n_long = len(model.tokenize(long_prompt))
    assert n_long > 8 * 32
    expected = [text(alone, prompt, 300) for prompt in PROMPTS[:3]]
    expected_long = text(alone, long_prompt, 20)

    received = [0, 0, 0]
    results: dict[int, str] = {}
    decoding = threading.Barrier(4)
    marks: dict[str, list[int]] = {}

    def other(i: int) -> None:
        out = []
        iterator = model.generate(model.tokenize(PROMPTS[i]), GREEDY)
        for token in iterator:
            out.append(token.piece)
            received[i] += 1
            if len(out) == 5:
                decoding.wait()
            if len(out) == 300:
                break
        iterator.close()
        results[i] = b"".join(out).decode()

    def long() -> None:
        decoding.wait()
        # Count batch sizes from here on: the others' prompts may have gone
        # through together in one step before, when nobody was decoding yet.
        with model._decoder._lock:
            model._decoder._max_batch = 0
        marks["submitted"] = list(received)
        out = []
        iterator = model.generate(model.tokenize(long_prompt), GREEDY)
        for token in iterator:
            if not out:
                marks["first"] = list(received)
            out.append(token.piece)
            if len(out) == 20:
                break
        iterator.close()
        results[3] = b"".join(out).decode()

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=long))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # The long prompt went through in chunks (in one step it would be all of
    # it), and the others kept decoding in between...
    assert model._decoder.statistics().max_batch <= 32 + 4
    for i in range(3):
        assert marks["first"][i] - marks["submitted"][i] >= 3
    # ...and nobody's text was disturbed.
    assert [results[i] for i in range(3)] == expected
    assert results[3] == expected_long


def test_a_short_prompt_is_not_held_behind_a_long_one(load, smollm2_path):
    # Real weights, one thread: the long prompt takes seconds, in ten chunks.
    options = {"n_ctx": 1024, "n_batch": 32, "host_cache_mb": 0}
    alone = load(smollm2_path, parallel=1, **options)
    model = load(smollm2_path, parallel=4, **options)
    long_prompt = " ".join(["apple river stone blue seven quick moon table"] * 48)
    short_prompt = "Hello there"
    n_long = len(model.tokenize(long_prompt))
    n_short = len(model.tokenize(short_prompt))
    assert n_long > 10 * 32
    expected_long = text(alone, long_prompt, 8)
    expected_short = text(alone, short_prompt, 3)
    decoder = model._decoder
    times: dict[str, float] = {}
    results: dict[str, str] = {}

    def long() -> None:
        started = time.monotonic()
        out = []
        iterator = model.generate(model.tokenize(long_prompt), GREEDY)
        for token in iterator:
            if not out:
                times["long"] = time.monotonic() - started
            out.append(token.piece)
            if len(out) == 8:
                break
        iterator.close()
        results["long"] = b"".join(out).decode()

    thread = threading.Thread(target=long)
    thread.start()
    deadline = time.monotonic() + 60
    while decoder.statistics().prompt_tokens == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    # The long prompt's first chunk is in: the short one arrives.
    started = time.monotonic()
    out = []
    iterator = model.generate(model.tokenize(short_prompt), GREEDY)
    for token in iterator:
        if not out:
            times["short"] = time.monotonic() - started
            evaluated = decoder.statistics().prompt_tokens
        out.append(token.piece)
        if len(out) == 3:
            break
    iterator.close()
    results["short"] = b"".join(out).decode()
    thread.join(timeout=120)

    # The short prompt went in after at most the long one's chunk in hand
    # (and the next, had the decoder begun it), not after all of it...
    assert evaluated <= 3 * 32 + n_short < n_long
    assert times["short"] < times["long"] / 3
    # ...and neither text changed.
    assert results == {"long": expected_long, "short": expected_short}


def test_prompts_go_fewest_tokens_first_and_a_long_one_is_not_starved(load, tiny_model_path):
    # The plan alone, step by step: the decode thread waits for work, and
    # this test holds the lock while it seats sequences by hand.
    model = load(tiny_model_path, parallel=4, n_batch=64)
    decoder = model._decoder
    served: list[str] = []
    names: dict[int, str] = {}

    def arrive(name: str, n: int) -> None:
        sequence = _Sequence([1] * n, None, threading.Condition(decoder._lock))
        slot = next(slot for slot in decoder._slots if slot.sequence is None)
        slot.sequence, sequence.slot = sequence, slot
        decoder._active.append(sequence)
        names[id(sequence)] = name

    def step() -> str:
        (sequence, start, count), *rest = decoder._plan()
        assert rest == [] and start == sequence.n_past
        assert count == min(64, sequence.n_prompt - sequence.n_past)
        sequence.n_past += count
        name = names[id(sequence)]
        served.append(name)
        if sequence.n_past == sequence.n_prompt:
            sequence.slot.sequence = None
            decoder._active.remove(sequence)
            return name + " done"
        return name

    with decoder._lock:
        try:
            # Two prompts of one length go one after the other, in order.
            arrive("a", 100)
            arrive("b", 100)
            assert [step() for _ in range(4)] == ["a", "a done", "b", "b done"]

            # A short prompt arriving while a long one is under way goes first.
            arrive("long", 1000)
            assert step() == "long"  # 936 left
            shorts = 0
            while True:
                arrive(f"short{shorts}", 40)
                name = step()
                if name.startswith("long"):
                    break
                assert name == f"short{shorts} done"
                shorts += 1
            # ...until the shorts overtook it by as many tokens as it had left:
            # then it goes first, to its end, ahead of the short one waiting.
            assert 936 - 40 <= 40 * shorts < 936
            while name != "long done":
                name = step()
                assert name.startswith("long")
            assert step() == f"short{shorts} done"
            assert decoder._active == []
        finally:
            for sequence in decoder._active:
                sequence.slot.sequence = None
            decoder._active.clear()


# -- the neuron ----------------------------------------------------------------------


async def test_worker_runs_parallel_jobs_and_queues_the_rest() -> None:
    model = FakeModel("fake", reply=lambda prompt: "x" * 200, token_delay=0.005)
    model.parallel = 3
    worker = GenerationWorker(model, queue_limit=1)

    def job() -> Job:
        return Job(GenerationRequest(tokens=[1, 2], sampling=GREEDY, max_tokens=200))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            running = [job() for _ in range(3)]
            for j in running:
                worker.submit(j)
            for j in running:
                await j.started.wait()
            waiting = job()
            worker.submit(waiting)
            stats = worker.statistics()
            assert (stats.in_flight, stats.queued, stats.parallel) == (3, 1, 3)
            with pytest.raises(QueueFull):
                worker.submit(job())
            running[0].cancel()
            for j in [*running[1:], waiting]:
                text, done = await collect(j)
                assert text == "x" * 200 and done.completion_tokens == 200
            worker.close(cancel=False)
    assert worker.statistics().in_flight == 0


async def test_neuron_serves_streams_at_once_and_429s_beyond_the_queue(tmp_path: Path) -> None:
    source = tmp_path / "slow.fake"
    source.write_text("fake")
    engine = FakeEngine(reply=lambda prompt: "x" * 10_000, token_delay=0.002, parallel=2)
    async with running_neuron([("slow", str(source))], plugins=[engine], queue_limit=1) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            body = {"model": "slow", "prompt": "Go", "max_tokens": 5000, "stream": True}
            queued: list[httpx.Response] = []

            async def wait_in_queue() -> None:
                short = {**body, "max_tokens": 20, "stream": False}
                queued.append(await http.post("/v1/completions", json=short))

            with trio.fail_after(30):
                async with (
                    http.stream("POST", "/v1/completions", json=body) as first,
                    http.stream("POST", "/v1/completions", json=body) as second,
                ):
                    # Both stream at once: each sends its first chunk. (Keep
                    # the iterators: a dropped one closes its response.)
                    streams = [response.aiter_lines() for response in (first, second)]
                    for lines in streams:
                        await anext(lines)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(wait_in_queue)
                        while (await http.get("/health")).json()["queue_depth"] < 1:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                        health = (await http.get("/health")).json()
                        assert (health["in_flight"], health["queue_depth"]) == (2, 1)
                        [status] = (await http.get("/models")).json()
                        assert (status["in_flight"], status["queued"]) == (2, 1)
                        assert status["parallel"] == 2
                        refused = await http.post("/v1/completions", json=body)
                        assert refused.status_code == 429
                        assert refused.headers["retry-after"]
                        assert refused.json()["error"]["type"] == "rate_limit_error"
                        metrics = (await http.get("/metrics")).text
                        assert 'cortex_neuron_requests_rejected_total{model="slow"} 1.0' in metrics
                        assert 'cortex_neuron_in_flight{model="slow"} 2.0' in metrics
                        assert 'cortex_neuron_queue_depth{model="slow"} 1.0' in metrics
                        # A client leaving frees its slot: the queued request is served.
                        await first.aclose()
            assert queued[0].status_code == 200
            assert queued[0].json()["usage"]["completion_tokens"] == 20


def test_a_full_pool_ends_the_longest_sequence_and_keeps_the_others_exact(load, tiny_model_path):
    # Four sequences of ~200 tokens each cannot share a pool of 512 cells.
    alone = load(tiny_model_path, parallel=1)
    expected = [text(alone, prompt, 200) for prompt in PROMPTS[:4]]
    model = load(tiny_model_path, parallel=4, kv_cells=512)
    assert model._decoder.kv_cells == 512
    results = concurrently(model, [(p, 200, GREEDY) for p in PROMPTS[:4]])
    stats = model._decoder.statistics()
    assert stats.preempted >= 1
    for got, want in zip(results, expected, strict=True):
        assert want.startswith(got)  # cut short, never wrong
    assert any(got == want for got, want in zip(results, expected, strict=True))
    assert stats.kv_used <= stats.kv_cells
    # The pool is whole again: a new sequence runs to the end.
    assert text(model, PROMPTS[5], 200) == text(alone, PROMPTS[5], 200)


def test_a_prompt_waits_for_room_and_idle_caches_go_first(load, tiny_model_path):
    alone = load(tiny_model_path, parallel=1)
    model = load(tiny_model_path, parallel=4, kv_cells=512)
    # Three slots end up holding ~160 cells each.
    work = [(p, 150, GREEDY) for p in PROMPTS[:3]]
    assert concurrently(model, work) == [text(alone, *w) for w in work]
    assert model._decoder.statistics().kv_used > 450
    # A long prompt needs more than the slot it takes frees: the least
    # recently used idle cache is dropped, and the new sequence runs whole.
    long_prompt = "the cat sat on the mat " * 25
    assert 250 < len(model.tokenize(long_prompt)) < 400
    assert text(model, long_prompt, 20) == text(alone, long_prompt, 20)
    stats = model._decoder.statistics()
    assert stats.evicted_tokens >= 150 and stats.preempted == 0
    assert stats.kv_used <= stats.kv_cells
    # Only what room needed went: an older cache is still in the pool.
    long_cells = len(model.tokenize(long_prompt)) + 20
    assert stats.kv_used >= long_cells + 150
