"""Neuron overhead: decode speed and time to first token, HTTP vs in-process.

Runs a demo model (SmolLM2-135M-Instruct Q4_1 by default, or Gemma 3 270M
Q4_K_M) twice with the same prompt, the
same threads, greedy, 128 tokens: once through llama-cpp-python called
directly, once through a neuron (a separate process) over its HTTP API with
streaming. Prints both and the ratios. Targets: neuron decode >= 0.95x
direct, time to first token within 10 ms of direct.

    .venv/bin/python contrib/bench/neuron.py [--model smollm2|gemma3] [--threads 2]
        [--runs 5] [--tokens 128] [--parallel P] [--option KEY=TOML]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PROMPT = "The history of the printing press begins in"


def prompt(run: int) -> str:
    # A different prompt each run, the same on both paths: neither side can
    # answer from a cached prompt.
    return f"Chapter {run}. {PROMPT}"


def demo_path(name: str) -> str:
    from cortex.neuron import sources

    return str(sources.resolve(sources.DEMO if name == "smollm2" else sources.DEMO_GEMMA))


def rate(times: list[float], tokens: int) -> float:
    # The first token belongs to prompt processing; decode is measured after it.
    return (tokens - 1) / (times[-1] - times[0])


def direct(path: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    from llama_cpp import Llama

    # n_threads_batch too: llama-cpp-python's default is every core, which
    # the neuron does not use for prompts either.
    llama = Llama(
        model_path=path,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    results = []
    try:
        for run in range(args.runs + 1):
            started = time.perf_counter()
            times = []
            for _ in llama.create_completion(
                prompt(run), max_tokens=args.tokens, temperature=0, stream=True
            ):
                times.append(time.perf_counter())
            if run:  # the first run warms up
                results.append((times[0] - started, rate(times, len(times))))
    finally:
        llama.close()
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_neuron(path: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
        config.write(
            f'[neuron]\nlisten = "127.0.0.1:{port}"\n[[models]]\nid = "demo"\n'
            f'source = "{path}"\n'
            + ('chat_format = "gemma"\n' if args.model == "gemma3" else "")
            + f"options = {{ n_threads = {args.threads}, n_ctx = {args.n_ctx}"
            + (f", parallel = {args.parallel}" if args.parallel else "")
            + "".join(f", {option}" for option in args.option)
            + " }\n"
        )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cortex",
            "--role",
            "neuron",
            "--config",
            config.name,
            "--log-level",
            "warning",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    models = client.get("/models").json()
                    if models and models[0]["status"] == "loaded":
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the neuron did not load the model in 60 s")
                time.sleep(0.1)
            body = {
                "model": "demo",
                "max_tokens": args.tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for run in range(args.runs + 1):
                body["prompt"] = prompt(run)
                started = time.perf_counter()
                times, tokens = [], 0
                with client.stream("POST", "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"] and chunk["choices"][0]["text"]:
                            times.append(time.perf_counter())
                if run:
                    results.append((times[0] - started, rate(times, tokens)))
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(config.name)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument(
        "--parallel", type=int, default=None, help="the neuron's parallel (default: the engine's)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=TOML",
        help="another engine option for the neuron, e.g. kv_unified=false",
    )
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    args = parser.parse_args()
    path = demo_path(args.model)
    print(
        f"{args.model}, {args.threads} threads, greedy, {args.tokens} tokens, {args.runs} runs, "
        f"parallel {args.parallel or 'default'}"
    )
    d = direct(path, args)
    n = through_neuron(path, args)
    d_ttft = statistics.median(t for t, _ in d) * 1000
    n_ttft = statistics.median(t for t, _ in n) * 1000
    d_rate = statistics.median(r for _, r in d)
    n_rate = statistics.median(r for _, r in n)
    print(f"{'':<10}{'TTFT ms':>10}{'decode tok/s':>15}")
    print(f"{'direct':<10}{d_ttft:>10.1f}{d_rate:>15.1f}")
    print(f"{'neuron':<10}{n_ttft:>10.1f}{n_rate:>15.1f}")
    print(f"decode ratio neuron/direct: {n_rate / d_rate:.3f} (target >= 0.95)")
    print(f"TTFT difference: {n_ttft - d_ttft:+.1f} ms (target <= 10 ms)")


if __name__ == "__main__":
    main()
