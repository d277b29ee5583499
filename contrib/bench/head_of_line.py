"""Head-of-line blocking: a short prompt that arrives while a long one is evaluated.

Loads the SmolLM2 demo through the llamacpp engine (``parallel`` slots, the
host tier off so every prompt is evaluated whole), once per ``--n-batch``
value, and starts a long prompt of ``--long-words`` words (``--long-tokens``
greedy tokens), waits until its first chunk has been evaluated, then sends a
short prompt (``--short-words`` words, ``--short-tokens`` greedy tokens):
with the decoder's order (fewest prompt tokens left first) and with the
order it had before (every step's prompt budget to the earliest prompt
until it was whole: ``arrival``, patched in here only). Each prompt is new
from its first token, so nothing is read from a cache. Prints, per order,
the medians over ``--rounds`` of the short request's time to first token
(from its arrival), the long one's (from its own), the wall time of the
pair and the tokens evaluated per second over it (prompts and generated
tokens); with ``--check``, whether both texts equal what each gives alone
on ``parallel 1`` (llama-cpp-python's own path; that costs a run of each).

    .venv/bin/python contrib/bench/head_of_line.py [--long-words 1500]
        [--short-words 5] [--rounds 1] [--threads 1] [--parallel 8]
        [--n-batch 512 128] [--n-ctx 4096] [--n-gpu-layers 0] [--check]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

WORDS = ["apple", "river", "stone", "blue", "seven", "quick", "moon"]


def long_text(seed: int, words: int) -> str:
    # A new first token every round: no slot shares a prefix with it.
    return f"Note {seed}: " + " ".join(WORDS[(seed * 3 + i * i) % len(WORDS)] for i in range(words))


def short_text(seed: int, words: int) -> str:
    return f"Q{seed}: " + " ".join(["hi"] * words)


def arrival_order(prompt: tuple[int, Any]) -> tuple[int, int]:
    """The order before: the earliest seated prompt first (one prompt a step, as now)."""
    return 0, prompt[0]


def run(model: Any, prompt: str, tokens: int, out: dict[str, Any], key: str) -> None:
    from cortex.harness import Sampling

    ids = model.tokenize(prompt)
    started = time.perf_counter()
    pieces = []
    iterator = model.generate(ids, Sampling(temperature=0.0))
    try:
        for token in iterator:
            if not pieces:
                out[key + "_ttft"] = time.perf_counter() - started
            pieces.append(token.piece)
            if len(pieces) == tokens:
                break
    finally:
        iterator.close()
    out[key] = b"".join(pieces).decode(errors="replace")
    out[key + "_tokens"] = len(ids) + len(pieces)


def pair(model: Any, long: str, short: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``long``; once its first chunk is in, ``short``; both timed."""
    decoder = model._decoder
    out: dict[str, Any] = {}
    before = decoder.statistics().prompt_tokens
    started = time.perf_counter()
    thread = threading.Thread(target=run, args=(model, long, args.long_tokens, out, "long"))
    thread.start()
    while decoder.statistics().prompt_tokens == before:
        time.sleep(0.001)
    run(model, short, args.short_tokens, out, "short")
    thread.join()
    out["wall"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-words", type=int, default=1500)
    parser.add_argument("--long-tokens", type=int, default=5)
    parser.add_argument("--short-words", type=int, default=5)
    parser.add_argument("--short-tokens", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--n-batch", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    from cortex.harness import LoadSpec, Placement, plugin_manager
    from cortex.neuron import sources

    pm = plugin_manager()
    path = str(sources.resolve(sources.DEMO))
    options = {
        "n_threads": args.threads,
        "n_ctx": args.n_ctx,
        "parallel": args.parallel,
        "host_cache_mb": 0,
        "n_gpu_layers": args.n_gpu_layers,
    }
    models = {
        n_batch: pm.hook.cortex_harness_load(
            spec=LoadSpec(model_id="bench", path=path, options=options | {"n_batch": n_batch}),
            placement=Placement(),
        )
        for n_batch in args.n_batch
    }
    first = models[args.n_batch[0]]
    # (label, model, the prompt order to patch in or None)
    orders: list[tuple[str, Any, Any]] = []
    for n, model in models.items():
        orders.append((f"arrival (before), n_batch {n}", model, arrival_order))
        orders.append((f"fewest left first, n_batch {n}", model, None))
    single = None
    if args.check:
        single = pm.hook.cortex_harness_load(
            spec=LoadSpec(model_id="single", path=path, options=options | {"parallel": 1}),
            placement=Placement(),
        )
    n_long = len(first.tokenize(long_text(0, args.long_words)))
    n_short = len(first.tokenize(short_text(0, args.short_words)))

    rows: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in orders}
    exact = {label: True for label in rows}
    for round_ in range(args.rounds):
        for index, (label, model, order) in enumerate(orders):
            seed = round_ * 10 + index
            long, short = long_text(seed, args.long_words), short_text(seed, args.short_words)
            decoder = model._decoder
            if order is not None:
                decoder._prompt_order = order
            try:
                result = pair(model, long, short, args)
            finally:
                vars(decoder).pop("_prompt_order", None)  # back to the class's own
            rows[label].append(result)
            if single is not None:
                # Each alone on llama-cpp-python's own path.
                reference: dict[str, Any] = {}
                run(single, short, args.short_tokens, reference, "short")
                run(single, long, args.long_tokens, reference, "long")
                exact[label] &= result["long"] == reference["long"]
                exact[label] &= result["short"] == reference["short"]
    for model in [*models.values(), *([single] if single is not None else [])]:
        model.unload()

    print(
        f"\nlong prompt {n_long} tokens ({args.long_tokens} generated), short prompt "
        f"{n_short} tokens ({args.short_tokens} generated) sent once the long one's first "
        f"chunk is in; {args.parallel} slots, {args.threads} thread(s); medians of "
        f"{args.rounds} round(s)"
    )
    print(
        f"{'prompt order':<32}{'short TTFT ms':>15}{'long TTFT ms':>14}"
        f"{'wall ms':>9}{'tokens/s':>10}{'exact':>7}"
    )
    for label, results in rows.items():

        def median(key: str, results: list[dict[str, Any]] = results) -> float:
            return statistics.median(r[key] for r in results)

        rate = statistics.median(
            (r["long_tokens"] + r["short_tokens"]) / r["wall"] for r in results
        )
        same = ("yes" if exact[label] else "NO") if single is not None else "-"
        print(
            f"{label:<32}{median('short_ttft') * 1000:>15.0f}{median('long_ttft') * 1000:>14.0f}"
            f"{median('wall') * 1000:>9.0f}{rate:>10.1f}{same:>7}"
        )


if __name__ == "__main__":
    main()
