"""Idle slots' cached prefixes: what they cost a stream decoding beside them.

A slot keeps the KV cells of its last sequence for prefix reuse. With a
unified KV pool (``kv_unified = true``, or ``auto`` where per-slot streams
do not fit) llama.cpp computes a step's attention over every cell up to the
highest one in use, masked to each sequence's own cells, so the cells idle
slots keep are attended to by every stream that decodes: the more cached
prefixes a model holds, the slower each token. Per-sequence streams
(``kv_unified = false``, or ``auto`` where they fit) give each slot its own
cells, at ``parallel`` times the KV memory. Both are asked for explicitly
here.

Loads the SmolLM2 demo through the llamacpp engine once per candidate and,
in interleaved rounds, times one stream alone (a fresh prompt of
``--prompt-tokens`` words, ``--tokens`` greedy tokens): on ``parallel 1``,
and on ``parallel N`` before and after ``--fill`` idle slots were given
cached sequences of ``--fill-tokens`` words each. Prints the median time
to first token and decode tokens/s of each and their ratio to
``parallel 1``. ``--concurrent 2 4 8`` then times that many streams started
at once on fresh models, unified pool against per-slot streams (which
split a step into one pass per run of consecutive busy slots): median time
to first token and tokens/s in all.

``steady`` (on by default, ``--sections``) is a session mix in steady
state: every slot holds a session's cached sequence of ``--fill-tokens``
words, and each round the sessions in slots ``--busy`` (1 3 6 by default:
not consecutive, as a real mix leaves them) take their next turn at once
(the cached sequence plus ``--turn-words`` new words, ``--tokens`` greedy
tokens), then as many sessions in consecutive slots, then one session
alone (a cached turn beside idle slots that cache theirs). Unified pool
(with the cells the per-slot streams have in all, so nothing is dropped)
against per-slot streams, and ``parallel 1`` holding the one session as
the mark: median time to first token, per-stream decode tokens/s, the
share of the prompt read from cache, and ratios to ``parallel 1``.

    .venv/bin/python contrib/bench/idle_slots.py [--parallel 8] [--fill 7]
        [--fill-tokens 1200] [--n-ctx 2048] [--rounds 5] [--threads 1]
        [--sections lone steady] [--busy 1 3 6] [--turn-words 50]
        [--concurrent 2 4 8] [--n-gpu-layers -1]

Measured on CPUs only so far. On a GPU the trade may differ: a decode step
there is bound by reading the weights, which per-slot streams do once per
run of consecutive busy slots, while the pool's extra attention is cheap;
``--n-gpu-layers -1`` runs the same tables there.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

SENTENCE = (
    "the system reads each request and checks the file before it writes a new version "
    "of the module while tests run in parallel on every change that reaches the branch"
)
WORDS = SENTENCE.split(" ")


def text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i) % len(WORDS)] for i in range(words)) + f" ({seed})"


def load(pm: Any, path: str, options: dict[str, Any]) -> Any:
    from cortex.harness import LoadSpec, Placement

    spec = LoadSpec(model_id="bench", path=path, options=options)
    return pm.hook.cortex_harness_load(spec=spec, placement=Placement())


def stream(model: Any, prompt: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it), greedy."""
    ttft, rate, _ = timed(model, prompt, tokens)
    return ttft, rate


def timed(model: Any, prompt: str, tokens: int) -> tuple[float, float, float]:
    """``stream``'s two numbers and the share of the prompt read from cache."""
    from cortex.harness import Sampling

    ids = model.tokenize(prompt)
    started = time.perf_counter()
    first = end = started
    n = cached = 0
    iterator = model.generate(ids, Sampling(temperature=0.0))
    try:
        for token in iterator:
            n += 1
            end = time.perf_counter()
            if n == 1:
                first = end
                cached = token.cached_tokens
            if n == tokens:
                break
    finally:
        iterator.close()
    return first - started, (n - 1) / max(end - first, 1e-9), cached / len(ids)


def turns(model: Any, prompts: list[str], tokens: int) -> list[tuple[float, float, float]]:
    """``timed`` for each of ``prompts``, all started at once."""
    results: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = timed(model, prompts[i], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def steady(pm: Any, path: str, args: argparse.Namespace, base: dict[str, Any]) -> None:
    """The ``steady`` section: sessions taking turns in slots that all hold a cache."""
    busy = sorted(set(args.busy))
    if not busy or busy[-1] >= args.parallel:
        raise SystemExit(f"--busy takes slot ids below --parallel ({args.parallel})")
    consecutive = list(range(len(busy)))
    alone = busy[:1]
    sessions = [text(1000 + i, args.fill_tokens) for i in range(args.parallel)]

    def turn(slot: int, round_: int, mix: int) -> str:
        # New words every turn: only the session's own prefix is cached.
        seed = (round_ * 10 + mix) * 100 + slot
        return f"{sessions[slot]} Turn {round_}.{mix}: " + text(seed, args.turn_words)

    cells = args.n_ctx * args.parallel
    modes = {
        "unified": base | {"parallel": args.parallel, "kv_cells": cells, "kv_unified": True},
        "per-slot": base | {"parallel": args.parallel, "kv_unified": False},
    }
    models = {}
    for name, options in modes.items():
        # Seated in order into empty slots: session i holds slot i.
        model = models[name] = load(pm, path, options)
        for session in sessions:
            stream(model, session, 2)
    mark = load(pm, path, base | {"parallel": 1})
    stream(mark, sessions[alone[0]], 2)
    mixes = {
        f"slots {' '.join(map(str, busy))} at once": busy,
        f"slots {' '.join(map(str, consecutive))} at once": consecutive,
        f"slot {alone[0]} alone": alone,
    }
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for round_ in range(args.rounds):
        rows.setdefault(("parallel 1, one session", "alone"), []).extend(
            turns(mark, [turn(alone[0], round_, len(mixes) - 1)], args.tokens)
        )
        for index, (mix, slots) in enumerate(mixes.items()):
            for name, model in models.items():
                prompts = [turn(slot, round_, index) for slot in slots]
                rows.setdefault((name, mix), []).extend(turns(model, prompts, args.tokens))
    for model in [*models.values(), mark]:
        model.unload()
    print(
        f"\nsteady state, {args.parallel} slots each holding a session of "
        f"{args.fill_tokens} words; a turn adds {args.turn_words} words and decodes "
        f"{args.tokens} greedy tokens; medians over {args.rounds} rounds"
    )
    print(f"{'':<44}{'TTFT ms':>9}{'decode tok/s':>14}{'cached':>8}{'TTFT x':>8}{'decode x':>10}")
    first = None
    for (name, mix), results in rows.items():
        ttft = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] for r in results)
        cached = statistics.median(r[2] for r in results)
        first = first or (ttft, rate)
        label = name if mix == "alone" and name.startswith("parallel 1") else f"{name}, {mix}"
        print(
            f"{label:<44}{ttft * 1000:>9.0f}{rate:>14.1f}{cached:>8.0%}"
            f"{ttft / first[0]:>8.2f}{rate / first[1]:>10.2f}"
        )


def together(model: Any, n: int, round_: int, words: int, tokens: int) -> tuple[float, float]:
    """(median seconds to first token, tokens/s in all) of ``n`` streams started at once."""
    results: list[tuple[float, float]] = [(0.0, 0.0)] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        prompt = f"Round {round_}, stream {i}: " + text(round_ * 100 + i, words)
        results[i] = stream(model, prompt, tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return statistics.median(r[0] for r in results), n * (tokens - 1) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--fill", type=int, default=7, help="idle slots given a cached sequence")
    parser.add_argument("--fill-tokens", type=int, default=1200)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context of one sequence")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--n-gpu-layers", type=int, default=0, help="layers offloaded (-1: all; a CUDA build)"
    )
    parser.add_argument("--concurrent", type=int, nargs="*", default=[])
    parser.add_argument(
        "--sections", nargs="*", choices=("lone", "steady"), default=["lone", "steady"]
    )
    parser.add_argument("--busy", type=int, nargs="+", default=[1, 3, 6], help="steady: slots")
    parser.add_argument("--turn-words", type=int, default=50, help="steady: words a turn adds")
    args = parser.parse_args()

    from cortex.harness import plugin_manager
    from cortex.neuron import sources

    pm = plugin_manager()
    path = str(sources.resolve(sources.DEMO))
    base = {"n_threads": args.threads, "n_ctx": args.n_ctx, "n_gpu_layers": args.n_gpu_layers}
    print(f"SmolLM2 demo, {args.threads} thread(s), {args.n_gpu_layers} layers offloaded")
    if "lone" in args.sections:
        lone(pm, path, args, base)
    if "steady" in args.sections:
        steady(pm, path, args, base)
    if args.concurrent:
        concurrent(pm, path, args, base)


def lone(pm: Any, path: str, args: argparse.Namespace, base: dict[str, Any]) -> None:
    """The ``lone`` section: one fresh stream beside idle slots that cache sequences."""
    # The unified pool gets the same cells as the split streams have in
    # all, so neither runs out of room for the idle slots' sequences.
    cells = args.n_ctx * args.parallel
    unified = {"parallel": args.parallel, "kv_cells": cells, "kv_unified": True}
    split = {"parallel": args.parallel, "kv_unified": False}
    candidates = {
        "parallel 1": (base | {"parallel": 1}, False),
        f"parallel {args.parallel}, unified, idle slots empty": (base | unified, False),
        f"parallel {args.parallel}, unified, {args.fill} idle slots cached": (base | unified, True),
        f"parallel {args.parallel}, per-slot streams, idle slots empty": (base | split, False),
        f"parallel {args.parallel}, per-slot streams, {args.fill} idle slots cached": (
            base | split,
            True,
        ),
    }
    # Filled candidates stay loaded (their idle slots keep what they were
    # given; each round's prompt takes a slot of its own or the last
    # round's). Empty ones are loaded afresh every round, so no earlier
    # round's sequence stays cached beside the stream.
    models = {}
    for name, (options, fill) in candidates.items():
        if fill:
            model = models[name] = load(pm, path, options)
            for i in range(args.fill):
                stream(model, text(1000 + i, args.fill_tokens), 2)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for round_ in range(args.rounds):
        prompt = f"Round {round_}: tell a long story. " + text(round_, args.prompt_tokens)
        for name, (options, fill) in candidates.items():
            if fill:
                results[name].append(stream(models[name], prompt, args.tokens))
                continue
            model = load(pm, path, options)
            try:
                results[name].append(stream(model, prompt, args.tokens))
            finally:
                model.unload()
    print(
        f"\none stream alone: {args.prompt_tokens}-word prompt, {args.tokens} greedy tokens; "
        f"{args.fill} idle slots of {args.fill_tokens} words; median of {args.rounds} rounds"
    )
    print(f"{'':<56}{'TTFT ms':>9}{'decode tok/s':>14}{'TTFT x':>8}{'decode x':>10}")
    first = None
    for name, rows in results.items():
        ttft = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[1] for r in rows)
        first = first or (ttft, rate)
        print(
            f"{name:<56}{ttft * 1000:>9.0f}{rate:>14.1f}"
            f"{ttft / first[0]:>8.2f}{rate / first[1]:>10.2f}"
        )
    for model in models.values():
        model.unload()


def concurrent(pm: Any, path: str, args: argparse.Namespace, base: dict[str, Any]) -> None:
    """``--concurrent``: streams started at once on a fresh model."""
    unified = {
        "parallel": args.parallel,
        "kv_cells": args.n_ctx * args.parallel,
        "kv_unified": True,
    }
    split = {"parallel": args.parallel, "kv_unified": False}
    print(f"\nstreams started at once on a fresh model, median of {args.rounds} rounds")
    print(f"{'':<40}{'TTFT p50 ms':>13}{'tokens/s':>10}")
    for n in args.concurrent:
        for name, options in (("unified", base | unified), ("per-slot streams", base | split)):
            rows = []
            for round_ in range(args.rounds):
                model = load(pm, path, options)
                try:
                    rows.append(together(model, n, round_, args.prompt_tokens, args.tokens))
                finally:
                    model.unload()
            ttft = statistics.median(r[0] for r in rows)
            rate = statistics.median(r[1] for r in rows)
            print(f"{f'{n} streams, {name}':<40}{ttft * 1000:>13.0f}{rate:>10.1f}")


if __name__ == "__main__":
    main()
