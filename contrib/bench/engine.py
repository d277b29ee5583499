"""Engine settings: prompt and decode speed of llama.cpp under each candidate.

Loads a demo model with llama-cpp-python once per candidate setting and, in
interleaved rounds (every candidate once per round, so a noisy neighbour
hits them alike), times a prompt of ``--prompt-tokens`` tokens and
``--tokens`` greedy tokens after it. Prints, per candidate, the median
prompt tokens/s and decode tokens/s and their ratio to the first candidate.

A candidate is ``extra_buffers=on|off`` (llama.cpp's repack/AMX weight
buffers, see the llamacpp engine's ``extra_buffers`` option) and
``threads=N``. ``--busy N`` starts N processes that spin on a core each
for the whole run: a host whose cores something else also wants, as in
standalone mode or next to a test suite.

    .venv/bin/python contrib/bench/engine.py [--model smollm2|gemma3]
        [--candidate extra_buffers=on,threads=2 ...] [--rounds 5] [--busy 0]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Iterator

DEFAULT_CANDIDATES = [
    "extra_buffers=on,threads=2",
    "extra_buffers=off,threads=2",
    "extra_buffers=on,threads=1",
]


def model_path(name: str) -> str:
    from cortex.neuron import sources

    return str(sources.resolve(sources.DEMO if name == "smollm2" else sources.DEMO_GEMMA))


def parse(candidate: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in candidate.split(","))


def load(path: str, settings: dict[str, str]):
    import llama_cpp

    from cortex_llamacpp.model import model_params

    with model_params(use_extra_bufts=settings.get("extra_buffers", "on") == "on"):
        return llama_cpp.Llama(
            model_path=path,
            n_ctx=2048,
            n_batch=512,
            n_threads=int(settings.get("threads", 2)),
            n_threads_batch=int(settings.get("threads", 2)),
            verbose=False,
        )


def measure(llama, round_: int, prompt_tokens: int, tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) for one prompt; a fresh prompt each round."""
    import llama_cpp

    words = f"Round {round_}. " + " ".join(f"item{(round_ * 31 + i) % 997}" for i in range(4096))
    prompt = llama.tokenize(words.encode())[:prompt_tokens]
    llama.reset()
    started = time.perf_counter()
    times = []
    for n, token in enumerate(llama.generate(prompt, temp=0.0, reset=True)):
        times.append(time.perf_counter())
        if n + 1 >= tokens or llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
            break
    prompt_rate = len(prompt) / (times[0] - started)
    decode_rate = (len(times) - 1) / (times[-1] - times[0])
    return prompt_rate, decode_rate


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    workers = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    parser.add_argument("--candidate", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes beside the run")
    args = parser.parse_args()
    candidates = args.candidate or DEFAULT_CANDIDATES
    path = model_path(args.model)
    models = {c: load(path, parse(c)) for c in candidates}
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in candidates}
    with busy(args.busy):
        for c in candidates:  # warm-up
            measure(models[c], -1, args.prompt_tokens, 8)
        for round_ in range(args.rounds):
            for c in candidates:
                results[c].append(measure(models[c], round_, args.prompt_tokens, args.tokens))
    print(
        f"{args.model}, {args.prompt_tokens}-token prompt, {args.tokens} tokens greedy, "
        f"median of {args.rounds} interleaved rounds, {args.busy} busy process(es)"
    )
    print(
        f"{'candidate':<32}{'prompt tok/s':>14}{'decode tok/s':>14}{'prompt x':>10}{'decode x':>10}"
    )
    base = None
    for c in candidates:
        p = statistics.median(r[0] for r in results[c])
        d = statistics.median(r[1] for r in results[c])
        base = base or (p, d)
        print(f"{c:<32}{p:>14.1f}{d:>14.1f}{p / base[0]:>10.2f}{d / base[1]:>10.2f}")


if __name__ == "__main__":
    main()
