"""The trace-replay instrument: fleet files, traces, fake neurons, the harness, the
bounds, and a short replay checked against the baseline policy."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import pathlib
import statistics
import subprocess
import sys
from typing import Any

import attrs
import pytest
import trio

from cortex.config import GatewaySection
from cortex.errors import ConfigError, ModelNotFound, Unavailable
from cortex.gateway.affinity import Prompt
from cortex.gateway.state import NeuronState
from cortex.harness import prefix_hashes
from cortex.sim import bound, cache
from cortex.sim.__main__ import main
from cortex.sim.clairvoyant import CLAIRVOYANT, HORIZON, Sends
from cortex.sim.fleet import FleetFile, SimModelSpec, SimNeuronSpec
from cortex.sim.neuron import Decoder, SimNeuron, batch_speedup
from cortex.sim.replay import (
    Outcome,
    Result,
    TraceRequest,
    _Clients,
    read_trace,
    replay,
    sessions,
    thrash_count,
)
from cortex.sim.report import Bounds, Row, percentile, sessions_table, table
from cortex.sim.trace import TraceSettings, generate, working_set, write
from cortex.sim.trace import main as trace_main

FLEET = pathlib.Path(__file__).resolve().parent.parent / "contrib" / "sim" / "fleet.toml"


def test_example_fleet_file() -> None:
    fleet = FleetFile.read(FLEET)
    assert len(fleet.neurons) == 3 and fleet.memory_mb == 96 * 1024
    assert sum(m.vram_mb for m in fleet.models) > 2 * fleet.memory_mb
    config = fleet.gateway_config("fixed")
    assert config.routing.policy == "fixed" and config.routing.max_wait == 300
    assert {m.id for m in fleet.catalogue().models} == {m.id for m in fleet.models}
    # What the fleet file leaves out is the gateway's default.
    assert config.gateway == GatewaySection()


def test_fleet_file_gateway_settings(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fleet.toml"
    body = '[[neurons]]\nname = "a"\ngpus = [1]\n[[models]]\nid = "m"\nvram_mb = 1\n'
    path.write_text("[gateway]\npoll_interval = 2\nload_timeout = 60\n" + body)
    config = FleetFile.read(path).gateway_config("predictive")
    assert config.gateway.poll_interval == 2 and config.gateway.load_timeout == 60
    assert config.gateway.first_byte_timeout == GatewaySection().first_byte_timeout
    path.write_text("[gateway]\npoll_every = 2\n" + body)
    with pytest.raises(ConfigError, match=r"poll_every.*\[gateway\]"):
        FleetFile.read(path)


def test_fleet_file_errors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[[neurons]]\nname = "a"\n[[models]]\nid = "m"\nvram_mb = 1\n')
    with pytest.raises(ConfigError, match="give gpus or memory_mb"):
        FleetFile.read(path)
    path.write_text('[[neurons]]\nname = "a"\ngpus = [1]\nspeed = 3\n')
    with pytest.raises(ConfigError, match="speed"):
        FleetFile.read(path)
    path.write_text(
        '[routing]\npolicy_x = 1\n[[neurons]]\nname = "a"\ngpus = [1]\n'
        '[[models]]\nid = "m"\nvram_mb = 1\n'
    )
    with pytest.raises(ConfigError, match=r"policy_x.*\[routing\]"):
        FleetFile.read(path)


def test_trace_files(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"t": 5, "model": "b", "prompt_tokens": 10, "max_tokens": 3, "stream": false,'
        ' "session": 4, "think": 2.5}\n\n{"t": 1, "model": "a"}\n'
    )
    requests = read_trace(path)
    assert [(r.t, r.model) for r in requests] == [(1.0, "a"), (5.0, "b")]
    assert requests[0].prompt_tokens == 500 and requests[1].max_tokens == 3
    # Left out: an OpenAI SDK stream without usage, alone.
    assert requests[0].stream and not requests[0].usage and requests[0].session is None
    assert not requests[1].stream and requests[1].session == 4 and requests[1].think == 2.5
    path.write_text('{"t": 1}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1: not a trace request"):
        read_trace(path)


def test_generator_is_deterministic_and_reaches_the_working_set(tmp_path) -> None:
    fleet = FleetFile.read(FLEET)
    settings = TraceSettings(duration=1800, seed=7)
    one, two = generate(fleet, settings), generate(fleet, settings)
    assert one == two and len(one) > 100
    assert working_set(fleet, one, settings.window) == pytest.approx(2.0, abs=0.25)
    assert {r.model for r in one} <= {m.id for m in fleet.models}
    # Sessions: most requests follow one for the same model within a minute.
    last: dict[str, float] = {}
    follows = 0
    for r in one:
        follows += r.t - last.get(r.model, -1e9) < 60
        last[r.model] = r.t
    assert follows > len(one) / 2
    out = tmp_path / "t.jsonl"
    with open(out, "w") as f:
        write(one, f)
    assert read_trace(out) == one
    # Sessions: one model each, the first sent at once, the others after a think.
    grouped = sessions([Outcome(r) for r in one])
    assert len(grouped) < len(one) / 3
    for group in grouped:
        assert len({o.request.model for o in group}) == 1 and group[0].request.think == 0
        assert all(o.request.think > 0 for o in group[1:])
    # What the proxy can measure: most stream, some with usage, some without.
    streams = [r for r in one if r.stream]
    assert 0.7 < len(streams) / len(one) < 0.9
    assert 0.3 < sum(r.usage for r in streams) / len(streams) < 0.7
    assert all(r.usage for r in one if not r.stream)
    # The same times whatever the shares.
    quiet = generate(fleet, TraceSettings(duration=1800, seed=7, stream=0.0))
    assert [r.t for r in quiet] == [r.t for r in one] and not any(r.stream for r in quiet)


async def test_sim_neuron_acts_out_loads_and_slots(autojump_clock: trio.abc.Clock) -> None:
    spec = SimModelSpec(id="m", vram_mb=6000, tokens_per_second=50, prefill_tokens_per_second=1000)
    neuron = SimNeuron(
        SimNeuronSpec(name="n", gpus=[8000], load_mbps=1000),
        {"m": spec, "big": SimModelSpec(id="big", vram_mb=4000)},
        clock=trio.current_time,
    )
    start = trio.current_time()
    status = await neuron.load("m", [0])
    assert trio.current_time() - start == pytest.approx(7.0)  # 1 + 6000 / 1000
    assert status.status == "loaded" and status.parallel == 1
    with pytest.raises(Unavailable):
        await neuron.load("big", [0])
    with pytest.raises(ModelNotFound):
        await neuron.generate("big", 10, 10)
    done = []

    async def ask() -> None:
        done.append(await neuron.generate("m", prompt_tokens=500, max_tokens=100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert neuron.health().queue_depth == 1 and neuron.health().in_flight == 1
    first, second = sorted(done, key=lambda g: g.first_token_at)
    assert first.first_token_at - first.slot_at == pytest.approx(0.5)
    assert second.slot_at == pytest.approx(first.done_at)  # one slot: in turn
    await neuron.unload("m")
    assert neuron.resident == {}
    assert [what for _, what, _ in neuron.log] == ["load", "refused", "unload"]


async def test_batched_decode_is_faster_in_all_but_slower_per_sequence(
    autojump_clock: trio.abc.Clock,
) -> None:
    assert [batch_speedup(n) for n in (1, 2, 3, 4, 8, 16)] == [1.0, 1.6, 1.8, 2.0, 2.4, 2.4]
    decoder = Decoder(tokens_per_second=100)
    ends: dict[str, float] = {}

    async def decode(name: str, delay: float) -> None:
        await trio.sleep(delay)
        await decoder.decode(100)
        ends[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(decode, "a", 0.0)
        nursery.start_soon(decode, "b", 0.5)
    # a alone for 0.5 s (50 tokens), then both at 80 tokens/s each (1.6x in
    # all): a's last 50 take 0.625 s; b's last 50 alone again, 0.5 s.
    assert ends["a"] - start == pytest.approx(1.125)
    assert ends["b"] - start == pytest.approx(1.625)
    assert decoder.left == {}


async def test_sim_neuron_refuses_loads_that_do_not_fit_beside_loads_in_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    models = {m: SimModelSpec(id=m, vram_mb=6000, load_seconds=10) for m in ("a", "b")}
    neuron = SimNeuron(SimNeuronSpec(name="n", gpus=[10000]), models, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(neuron.load, "a", [0])
        await trio.sleep(1)
        assert neuron.used() == {0: 0} and neuron.used(loading=True) == {0: 6000}
        with pytest.raises(Unavailable):
            await neuron.load("b", [0])
    assert [what for _, what, _ in neuron.log] == ["refused", "load"]
    assert neuron.used(loading=True) == {0: 6000}


class RecordingRouter:
    """A router stand-in that routes everything to one neuron and records releases."""

    def __init__(self) -> None:
        self.neuron = NeuronState(name="n", endpoint="sim://n")
        self.released: list[dict[str, Any]] = []
        self.prompts: list[Prompt | None] = []

    async def acquire(
        self, model_id: str, *, exclude: set[str], prompt: Prompt | None = None
    ) -> NeuronState:
        await trio.lowlevel.checkpoint()
        self.prompts.append(prompt)
        return self.neuron

    def release(self, neuron: NeuronState, model_id: str, **figures: Any) -> None:
        self.released.append(figures)

    def forget(self, neuron: NeuronState, model_id: str) -> None:
        raise AssertionError("the model stays loaded")


async def clients_on_one_neuron() -> tuple[_Clients, RecordingRouter]:
    spec = SimModelSpec(id="m", vram_mb=1, tokens_per_second=100, prefill_tokens_per_second=1000)
    sim = SimNeuron(SimNeuronSpec(name="n", gpus=[10]), {"m": spec}, clock=trio.current_time)
    await sim.load("m", [0])
    router = RecordingRouter()
    clients = _Clients(router, {"n": sim}, 300.0, 0, trio.current_time())  # type: ignore[arg-type]
    return clients, router


async def test_the_router_learns_only_what_the_proxy_can_tell(
    autojump_clock: trio.abc.Clock,
) -> None:
    clients, router = await clients_on_one_neuron()
    requests = [
        TraceRequest(t=0, model="m", prompt_tokens=500, max_tokens=100, stream=True, usage=True),
        TraceRequest(t=0, model="m", prompt_tokens=500, max_tokens=100, stream=True),
        TraceRequest(t=0, model="m", prompt_tokens=500, max_tokens=100, stream=False, usage=True),
        TraceRequest(t=0, model="m", prompt_tokens=500, max_tokens=100, usage=True, tool=True),
    ]
    for request in requests:
        outcome = Outcome(request)
        await clients.send(outcome)
        assert outcome.ttft == pytest.approx(0.5) and outcome.wait == pytest.approx(0)
    with_usage, without, whole, calling = router.released
    # An answer that calls a tool: the proxy tells the router its result will follow.
    assert calling == {**with_usage, "decode_s": pytest.approx(1.0), "follows": True}
    assert with_usage == {
        "first_token_s": pytest.approx(0.5),
        "completion_tokens": 100,
        "decode_s": pytest.approx(1.0),
        "prompt": None,
        "follows": False,
    }
    assert without == {
        "first_token_s": pytest.approx(0.5),
        "completion_tokens": None,
        "decode_s": None,
        "prompt": None,
        "follows": False,
    }
    assert whole == {
        "first_token_s": None,
        "completion_tokens": 100,
        "decode_s": None,
        "prompt": None,
        "follows": False,
    }


async def test_a_closed_loop_session_waits_for_each_answer(
    autojump_clock: trio.abc.Clock,
) -> None:
    clients, _ = await clients_on_one_neuron()
    first = TraceRequest(t=0, model="m", prompt_tokens=500, max_tokens=100, session=1)
    # Sent at 1.0 on an idle fleet; after the answer (1.5 s) and 4 s of thought here.
    second = TraceRequest(t=1.0, model="m", session=1, think=4.0)
    outcomes = [Outcome(first), Outcome(second)]
    await clients.session(outcomes)
    assert outcomes[1].sent == pytest.approx(outcomes[0].sent + 1.5 + 4.0)


def test_thrash_count_and_percentiles() -> None:
    logs = [(0, "load", "a"), (10, "unload", "a"), (100, "load", "a"), (200, "unload", "a")]
    assert thrash_count([*logs, (900, "load", "a")], 600) == 1
    assert thrash_count([*logs, (700, "load", "a")], 600) == 2
    assert thrash_count([*logs, (700, "refused", "a")], 600) == 1
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile(list(range(1, 101)), 99) == 99


def test_unserved_requests_count_as_an_infinite_time_to_first_token() -> None:
    requests = [TraceRequest(t=i, model="m") for i in range(200)]
    outcomes = [Outcome(r, ttft=1.0, wait=0.0) for r in requests]
    result = Result("fixed", outcomes, [], 1, 0, 0, 0, 300.0, 200.0, {})
    assert Row.of(result).ttft_p99 == 1.0
    # Two of 200 unserved: the 198th of 200 is still 1 s ...
    outcomes[0].ttft = outcomes[0].wait = None
    outcomes[1].ttft = outcomes[1].wait = None
    assert Row.of(result).ttft_p99 == 1.0
    # ... three: it is infinite.
    outcomes[2].ttft = outcomes[2].wait = None
    outcomes[3].wait = 301.0
    row = Row.of(result)
    assert row.unserved == 3 and row.late == 1
    assert row.ttft_p50 == 1.0 and math.isinf(row.ttft_p99) and math.isinf(row.ttft_max)
    text = table([result], Bounds(instant=1, floor=(0.0, 1.0)))
    assert text.splitlines()[2].split()[-7:] == ["1.00", "inf", "inf", "301.00", "3", "1", "0"]


SLOW = """
[routing]
max_wait = 300
[[neurons]]
name = "a"
gpus = [10000]
[[models]]
id = "slow"
vram_mb = 5000
load_seconds = 400
"""


def test_no_request_waits_past_max_wait(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(SLOW)
    fleet = FleetFile.read(path)
    trace = [TraceRequest(t=0, model="slow")]
    # A queueing policy gives up on the load at max_wait (the load goes on)...
    waiting = replay(fleet, trace, "predictive")
    assert waiting.unserved == 1 and "still loading" in (waiting.outcomes[0].error or "")
    # ... the fixed one serves it late, as its table row says.
    fixed = Row.of(replay(fleet, trace, "fixed"))
    assert fixed.unserved == 0 and fixed.late == 1 and fixed.wait_max >= 400


def test_a_replay_is_reproducible_from_its_seed() -> None:
    fleet = FleetFile.read(FLEET)
    trace = generate(fleet, TraceSettings(duration=300, seed=3))
    one, two = (replay(fleet, trace, "predictive", seed=7) for _ in range(2))
    assert [o.ttft for o in one.outcomes] == [o.ttft for o in two.outcomes]
    assert one.cold_loads == two.cold_loads and one.seed == 7
    others = [replay(fleet, trace, "predictive", seed=s) for s in range(3)]
    assert all(r.cold_loads > 0 for r in others)


def test_short_replay_against_the_baseline() -> None:
    fleet = FleetFile.read(FLEET)
    trace = generate(fleet, TraceSettings(duration=900, seed=2))
    max_wait = fleet.gateway_config("predictive").routing.max_wait
    fixed = replay(fleet, trace, "fixed")
    predictive = replay(fleet, trace, "predictive")
    patient = replay(fleet, trace, "predictive", routing={"patience": 30.0})
    careful = replay(fleet, trace, "predictive", routing={"patience": 30.0, "patience_tail": 97.0})
    holding = replay(fleet, trace, "predictive", routing={"patience": 4.0, "patience_limit": 300})
    base, ours, fewer, tail, fewest = (
        Row.of(r) for r in (fixed, predictive, patient, careful, holding)
    )
    print(table([fixed, predictive, patient, careful, holding]))
    for row in (base, ours, fewer, tail, fewest):
        assert row.requests == len(trace) and row.cold_loads > 0
    # Every request served, none waited past the maximum.
    for row in (ours, fewer, tail, fewest):
        assert row.unserved == 0 and row.late == 0 and row.wait_max <= max_wait
    # Measured (closed loop, seed 0): fixed 85 loads, p99 21.6 s; predictive
    # 94, 17.1 s; patience 30 held to the slowest 1% of the others: 79,
    # 19.2 s; to the slowest 3% (patience_tail = 97): 84, 18.0 s;
    # patience 4 held up to 300 s: 56, 61 s.
    assert ours.ttft_p99 < 0.9 * base.ttft_p99
    assert ours.cold_loads <= 1.2 * base.cold_loads
    # Patience within the tail: fewer loads and less thrash, and a shorter tail still.
    assert fewer.cold_loads < 0.95 * base.cold_loads and fewer.thrash < base.thrash
    assert fewer.ttft_p99 < base.ttft_p99
    # Held to a lower percentile: less held, a shorter tail, no more loads than fixed.
    assert tail.ttft_p99 < fewer.ttft_p99 and tail.cold_loads <= base.cold_loads
    # Patience without a limit: fewer loads yet, bought with waiting.
    assert fewest.cold_loads < 0.75 * base.cold_loads
    assert fewest.ttft_p99 > 2 * base.ttft_p99
    assert predictive.decisions["queued"] > 0 and fixed.decisions["queued"] == 0


def test_the_floor_lets_requests_wait_where_the_on_arrival_optimum_does_not() -> None:
    pytest.importorskip("scipy")
    # One model fits at a time; two sessions interleave, a request every 10 s,
    # each 2 s long (1 s prefill, 1 s decode).
    models = {
        m: {"vram_mb": 10, "tokens_per_second": 100, "prefill_tokens_per_second": 100}
        for m in ("a", "b")
    }
    trace = [
        {"t": 10.0 * i, "model": "ab"[i % 2], "prompt_tokens": 100, "max_tokens": 100}
        for i in range(6)
    ]
    # Served on arrival: a load each. Within 300 s: all of a's, then all of b's.
    assert bound.bound(models, 10, trace, busy=False) == 6
    served = bound.floor(models, 10, trace, max_wait=300, step=1, time_limit=30)
    assert served.lower == served.upper == 2 and served.optimal
    assert bound.floor(models, 10, trace, max_wait=5, step=1, time_limit=30).lower == 6
    # A p99 within 3 s leaves no request room to wait: a load each again.
    assert bound.floor(models, 10, trace, max_wait=300, p99=3.0, step=1).lower == 6
    # Coarser grids prove less, never more.
    for step in (5.0, 30.0):
        assert bound.floor(models, 10, trace, max_wait=5, step=step, time_limit=30).lower <= 6


#: contrib/sim/bound.py's values for the short replay's trace (900 s, seed 2).
INSTANT_SHORT, BUSY_SHORT, FLOOR_SHORT = 37, 53, 25


def test_bounds_on_the_short_trace(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("scipy")
    fleet = FleetFile.read(FLEET)
    short = generate(fleet, TraceSettings(duration=900, seed=2))
    models, memory, trace = bound.inputs(fleet, short)
    assert bound.bound(models, memory, trace, busy=True) == pytest.approx(BUSY_SHORT)
    instant = bound.bound(models, memory, trace, busy=False)
    relaxed = bound.bound(models, memory, trace, busy=False, integral=False)
    assert len({r["model"] for r in trace}) <= relaxed <= instant == INSTANT_SHORT
    found = bound.floor(models, memory, trace, max_wait=300, time_limit=30)
    assert found.lower == FLOOR_SHORT and found.lower <= found.upper
    # The on-arrival optima are no floor for a router that holds requests
    # back; the floor is: no replay (open loop: the trace's own times) goes
    # below it.
    settings = {"patience": 10.0, "patience_limit": 300}
    holding = replay(fleet, short, "predictive", routing=settings, loop="open")
    assert FLOOR_SHORT <= holding.cold_loads < BUSY_SHORT
    # The script in contrib runs the same program.
    out = tmp_path / "short.jsonl"
    with open(out, "w") as f:
        write(short, f)
    script = FLEET.parent / "bound.py"
    run = subprocess.run(
        [sys.executable, str(script), "--fleet", str(FLEET), str(out), "--no-floor"],
        capture_output=True,
        text=True,
        check=True,
    )
    used = len({r["model"] for r in trace})
    assert run.stdout.splitlines()[1].split()[1:5] == ["452", str(used), "37", "53"]


def test_command_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [{"t": i * 2.0, "model": "Qwen/Qwen3-0.6B", "max_tokens": 20} for i in range(5)]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plot = tmp_path / "plot.png"
    args = ["--fleet", str(FLEET), "--trace", str(trace), "--policy", "predictive", "--jobs", "1"]
    code = main([*args, "--policy", "static", "--plot", str(plot), "--floor", "0"])
    out = capsys.readouterr()
    lines_out = out.out.splitlines()
    assert lines_out[0].split()[:3] == ["policy", "requests", "cold"]
    assert [line.split()[0] for line in lines_out[2:]] == ["predictive", "static"]
    assert lines_out[2].split()[1:3] == ["5", "1"]  # five requests, one cold load
    if importlib.util.find_spec("matplotlib") is not None:
        assert code == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    else:
        assert code == 1 and "matplotlib" in out.err
    assert main(["--fleet", str(tmp_path / "nope.toml"), "--trace", str(trace)]) == 2
    assert main([*args, "--routing", "nonsense=1"]) == 2
    assert main([*args, "--policy", "clairvoyant", "--floor", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[3].split()[:3] == ["clairvoyant", "5", "1"]
    assert main([*args, "--policy", "clairvoyant", "--loop", "open"]) == 2
    assert "need --loop closed" in capsys.readouterr().err
    assert main([*args, "--compare", "patience=-1"]) == 2
    assert main([*args, "--compare", "patience=1,nonsense=2"]) == 2
    capsys.readouterr()
    # Three replays each (two processes), medians and ranges, and the bounds.
    more = ["--compare", "patience=1,min_residency=30", "--replays", "3", "--jobs", "2"]
    assert main([*args[:-2], *more, "--policy", "fixed"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [" ".join(row.split()[:2]) for row in rows] == [
        "predictive 5",
        "fixed 5",
        "predictive patience=1,min_residency=30",
        "B: serves",
        "floor: waits",
    ]
    assert rows[0].split()[2:4] == ["1", "(1-1)"]
    # One model, asked for five times: one load, and nothing to win.
    assert rows[3].split()[-1] == rows[4].split()[-1] == "1"


# -- the clairvoyant references ---------------------------------------------------------


def test_what_the_clairvoyant_references_know_of_the_sends_to_come() -> None:
    # Three turns in two sessions: one answer in three is followed by another.
    exact = Sends.of(CLAIRVOYANT["clairvoyant"], [0.0, 4.0, 8.0, 0.0], 2)
    assert exact.think == 6.0  # the mean of later turns' think times
    assert exact.going_on == 0.5
    exact.start("a", 10.0)
    exact.start("a", 50.0)
    assert exact.next_send("a", 0.0) == 10.0 and exact.next_send("b", 0.0) == math.inf
    assert exact.next_send("a", 10.0) == 10.0 and exact.next_send("a", 11.0) == 50.0
    # Session 1 answered at 12 s, thinks 3 s: its next turn comes at 15 s.
    exact.answered(1, "a", 12.0, 3.0)
    assert exact.next_send("a", 12.0) == 15.0
    assert exact.chance("a", 12.0) == 1.0 and exact.chance("b", 12.0) == 0.0
    # Late (its think time is over): it comes now.
    assert exact.next_send("a", 16.0) == 16.0
    exact.sending(1, "a", 16.0)
    assert exact.next_send("a", 16.0) == 50.0
    assert exact.chance("a", 16.0) == 0.0  # 34 s away: beyond the horizon
    # The last answer of a session: nothing more of it.
    exact.answered(1, "a", 17.0, None)
    assert exact.next_send("a", 17.0) == 50.0
    # Knowing only that the session goes on: the mean think time after its answer.
    guess = Sends.of(CLAIRVOYANT["clairvoyant-continuation"], [0.0, 4.0, 8.0], 1)
    guess.answered(1, "b", 12.0, 3.0)
    assert guess.next_send("b", 12.0) == 18.0
    # Knowing think times but not starts: sessions to come are not counted.
    thinks = Sends.of(CLAIRVOYANT["clairvoyant-thinks"], [0.0, 4.0, 8.0], 1)
    thinks.start("a", 10.0)
    assert thinks.next_send("a", 0.0) == math.inf and thinks.chance("a", 9.0) == 0.0


def test_what_a_gateway_knows_is_a_chance_that_fades_as_a_session_stays_quiet() -> None:
    # Sessions of 4 turns on average (3 answers in 4 are followed by
    # another), 20 s between them: the generator's shape.
    blind = Sends.of(CLAIRVOYANT["clairvoyant-none"], [0.0, 20.0, 20.0, 20.0], 1)
    assert blind.going_on == 0.75
    assert blind.chance("a", 0.0) == 0.0  # no session under way
    blind.answered(1, "a", 100.0, 5.0)  # its think time is not known
    assert blind.next_send("a", 100.0) == math.inf
    within = 1 - math.exp(-HORIZON / 20)
    assert blind.chance("a", 100.0) == pytest.approx(0.75 * within)
    # Quiet for 40 s: the posterior that it goes on is q e^-2 / (q e^-2 + 1 - q).
    decay = 0.75 * math.exp(-2)
    assert blind.chance("a", 140.0) == pytest.approx(within * decay / (decay + 0.25))
    # A second session of it: either may send.
    blind.answered(2, "a", 140.0, None)  # whether it was the last is not known
    one = within * decay / (decay + 0.25)
    assert blind.chance("a", 140.0) == pytest.approx(1 - (1 - one) * (1 - 0.75 * within))
    # A send clears it.
    blind.sending(1, "a", 141.0)
    blind.sending(2, "a", 141.0)
    assert blind.chance("a", 141.0) == 0.0


FOUR = """
[[neurons]]
name = "a"
gpus = [10000]
[[models]]
id = "a"
vram_mb = 5000
load_seconds = 2
tokens_per_second = 100
prefill_tokens_per_second = 1000
[[models]]
id = "b"
vram_mb = 5000
load_seconds = 2
tokens_per_second = 100
prefill_tokens_per_second = 1000
[[models]]
id = "c"
vram_mb = 5000
load_seconds = 2
tokens_per_second = 100
prefill_tokens_per_second = 1000
"""


def test_a_clairvoyant_router_evicts_the_model_nobody_asks_for_again(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(FOUR)
    fleet = FleetFile.read(path)
    # Two of the three fit. Session 0 uses a, a turn 4 s after each answer;
    # b is asked for once; c comes when a has been idle longest.
    turn = {"prompt_tokens": 100, "max_tokens": 10}
    trace = [
        TraceRequest(t=0.0, model="a", session=0, **turn),
        TraceRequest(t=0.5, model="b", session=1, **turn),
        TraceRequest(t=4.0, model="c", session=2, **turn),
        TraceRequest(t=6.2, model="a", session=0, think=4.0, **turn),
        TraceRequest(t=10.4, model="a", session=0, think=4.0, **turn),
    ]
    fixed = replay(fleet, trace, "fixed")
    seer = replay(fleet, trace, "clairvoyant")
    guess = replay(fleet, trace, "clairvoyant-continuation")
    blind = replay(fleet, trace, "clairvoyant-none")
    # LRU unloads a for c and loads it again for its next turn; knowing the
    # sends to come, b goes, and a's turns find it loaded.
    assert fixed.cold_loads == 4
    assert seer.cold_loads == guess.cold_loads == 3
    # Knowing nothing, a and b are alike when c comes: c is held until a's
    # next turn shows that a's session goes on; then b goes.
    assert blind.cold_loads == 3
    held = next(o.ttft for o in blind.outcomes if o.request.model == "c")
    quick = next(o.ttft for o in seer.outcomes if o.request.model == "c")
    assert held is not None and quick is not None and held > quick + 2.0
    for result in (seer, guess, blind):
        assert result.unserved == 0
        later = [o.ttft for o in result.outcomes if o.request.model == "a"][1:]
        assert later == [pytest.approx(0.1)] * 2  # the prompt alone, no load
    with pytest.raises(ValueError, match="closed-loop"):
        replay(fleet, trace, "clairvoyant", loop="open")


# -- prompt caches and agent sessions ------------------------------------------------------


def test_prompts_share_a_prefix_as_far_as_their_runs_agree() -> None:
    one = (("system", 100), ("document-1", 50), ("user-1-0", 10))
    assert cache.shared(one, (*one, ("answer-1-0", 5))) == 160
    assert cache.shared(one, (("system", 100), ("document-2", 50))) == 100
    assert cache.shared(one, (("system", 40),)) == 40
    assert cache.cut(one, 120) == (("system", 100), ("document-1", 20))
    # The bytes, and the token ids, of a run cut short start the whole run's.
    assert cache.render(one).startswith(cache.render(cache.cut(one, 120)))
    assert len(cache.render(one)) == 4 * 160
    assert list(cache.token_ids(one))[:120] == list(cache.token_ids(cache.cut(one, 120)))


def test_the_prompt_cache_seats_restores_and_saves_as_the_engine_does() -> None:
    # Two slots, a host tier for two 1000-token states (1 KiB a token).
    pc = cache.PromptCache(slots=2, budget_bytes=2000 * 1024, kv_bytes_per_token=1024)
    system = ("system", 600)

    def turn(n: int, *more: cache.Run) -> cache.Runs:
        return (system, (f"document-{n}", 300), *more)

    first = [pc.seat(turn(n, (f"user-{n}", 50))) for n in range(2)]
    assert [s.cached for s in first] == [0, 0]  # nothing cached yet, two slots
    for n, seat in enumerate(first):
        pc.done(seat, turn(n, (f"user-{n}", 50), (f"answer-{n}", 50)))
    # Session 2 shares the system prompt with both: it takes the least
    # recently used slot (session 0's), whose state goes to the host tier.
    third = pc.seat(turn(2, ("user-2", 50)))
    assert (third.slot_tokens, third.host_tokens, pc.host_saves) == (600, 0, 1)
    pc.done(third, turn(2, ("user-2", 50), ("answer-2", 50)))
    # Session 0's next turn: its whole conversation comes back from the host
    # tier, into the least recently used slot (session 1's, saved first).
    again = turn(0, ("user-0", 50), ("answer-0", 50), ("user-0b", 40))
    seat = pc.seat(again)
    assert (seat.slot_tokens, seat.host_tokens) == (0, 1000)
    assert (pc.host_restores, pc.host_saves, pc.host_evictions) == (1, 2, 0)
    stats = pc.statistics()
    assert (stats.hits, stats.misses, stats.slot_tokens, stats.host_tokens) == (2, 2, 600, 1000)
    assert stats.host_entries == 2 and stats.host_bytes == 2000 * 1024
    # The block hashes a real neuron reports, most recently used slot first
    # (the restored 1000 tokens: three whole blocks), then the other's.
    restored = tuple(prefix_hashes(cache.token_ids(turn(0, ("user-0", 50), ("answer-0", 50)))))
    other = prefix_hashes(cache.token_ids(turn(2, ("user-2", 50), ("answer-2", 50))))
    assert len(restored) == 3 and stats.blocks[:3] == restored
    assert stats.blocks[3] == other[2]  # the system prompt's two are there already
    # A saved state that a newer one extends is dropped; the budget evicts LRU.
    pc.done(seat, (*again, ("answer-0b", 30)))
    assert pc.seat(turn(3, ("user-3", 50))).slot_tokens == 600
    assert pc.statistics().host_entries == 2 and pc.host_evictions == 1


async def test_a_sim_neuron_serves_a_cached_prefix_faster_and_reports_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    spec = SimModelSpec(
        id="m", vram_mb=1, tokens_per_second=100, prefill_tokens_per_second=1000, slots=1
    )
    neuron = SimNeuron(SimNeuronSpec(name="n", gpus=[10]), {"m": spec}, clock=trio.current_time)
    await neuron.load("m", [0])
    prompt = (("system", 2000), ("user-0", 48))
    first = await neuron.generate("m", 0, 100, prompt=prompt, answer="answer-0")
    assert first.first_token_at - first.slot_at == pytest.approx(2.048)
    assert first.cached_tokens == 0
    again = (*prompt, ("answer-0", 100), ("user-1", 52))
    second = await neuron.generate("m", 0, 10, prompt=again)
    assert second.cached_tokens == 2148 and second.restored_tokens == 0
    assert second.first_token_at - second.slot_at == pytest.approx(0.052)
    # Another prompt takes the one slot; the session's state is restored
    # from the host tier at restore_mbps: milliseconds, not seconds.
    await neuron.generate("m", 0, 10, prompt=(("other", 500),))
    third = await neuron.generate("m", 0, 10, prompt=(*again, ("x", 10), ("user-2", 40)))
    assert third.restored_tokens == 2200 and third.cached_tokens == 2200
    restore = 2200 * 22.5 * 1024 / (2000 * 2**20)
    assert third.first_token_at - third.slot_at == pytest.approx(0.050 + restore)
    reported = neuron.status("m").prompt_cache
    assert reported is not None
    assert (reported.hits, reported.misses, reported.host_restores) == (2, 2, 1)
    # Unloading throws the cache away, counted: the host tier (the session's
    # 2210 tokens, the other prompt's 510 saved when the restore took its
    # slot) and the slot (the third prompt, 2250 tokens, and its answer).
    assert reported.host_bytes == (2210 + 510) * spec.kv_bytes_per_token
    held = 2210 + 510 + 2250 + 10
    await neuron.unload("m")
    assert neuron.dropped_tokens == held


def agent_fleet(*, slots: int, host_cache_mb: int, neurons: int = 2) -> FleetFile:
    return FleetFile(
        neurons=[SimNeuronSpec(name, gpus=[10000], activate=["m"]) for name in "ab"[:neurons]],
        models=[
            SimModelSpec(
                "m",
                vram_mb=6000,
                tokens_per_second=50,
                prefill_tokens_per_second=1000,
                slots=slots,
                host_cache_mb=host_cache_mb,
                kv_kib_per_token=128,
            )
        ],
    )


AGENTS = TraceSettings(
    duration=1800,
    seed=1,
    sessions_per_minute=0,
    agents=6,
    agent_kinds=1,
    turns=6,
    agent_spread=60,
    agent_think=5,
    # Answers in words only: the trace these tests' figures were measured on.
    tool_share=0.0,
)


def test_agent_sessions_in_the_trace_generator(tmp_path: pathlib.Path) -> None:
    fleet = FleetFile.read(FLEET)
    settings = attrs.evolve(AGENTS, agents=5, agent_kinds=2, agent_keys=0.5)
    agents = generate(fleet, settings)
    assert agents == generate(fleet, settings) and all(r.agent for r in agents)
    grouped = sessions([Outcome(r) for r in agents])
    assert len(grouped) == 5 and len(agents) > 10
    kinds = set()
    for group in grouped:
        turns = [o.request for o in group]
        assert len({r.model for r in turns}) == 1 and len({r.key for r in turns}) == 1
        kinds.add(turns[0].prompt[0])
        assert turns[0].prompt[0][1] == 3000 and turns[0].prompt[1][1] == 1500
        for before, after in itertools.pairwise(turns):
            # Each turn re-sends the conversation: the last prompt, its answer, a message.
            assert after.prompt[:-2] == before.prompt
            assert after.prompt[-2] == (before.answer, before.max_tokens)
            assert after.prompt_tokens == cache.length(after.prompt) > before.prompt_tokens
            assert after.think > 0
    assert len(kinds) == 2
    assert {r.key is None for r in agents} == {True, False}
    # Agents come on top of the ordinary traffic, which they leave as it was.
    plain = generate(fleet, TraceSettings(duration=1800, seed=7))
    mixed = generate(fleet, attrs.evolve(settings, seed=7, sessions_per_minute=None))
    assert [r for r in mixed if not r.agent] == plain
    assert min(r.session for r in mixed if r.agent) > max(r.session for r in plain)
    out = tmp_path / "agents.jsonl"
    with open(out, "w") as f:
        write(mixed, f)
    assert read_trace(out) == mixed
    with pytest.raises(ConfigError):
        generate(fleet, attrs.evolve(settings, agent_model="nope"))


def test_affinity_keeps_sessions_on_the_replica_that_holds_their_cache() -> None:
    # Two replicas of two slots, no host tier, six agent sessions of ~4.7k
    # tokens growing by a turn: only affinity keeps a session on its cache.
    fleet = agent_fleet(slots=2, host_cache_mb=0)
    trace = generate(fleet, AGENTS)
    on = replay(fleet, trace, "predictive", seed=1)
    off = replay(fleet, trace, "predictive", routing={"affinity": False}, seed=1)
    assert replay(fleet, trace, "predictive", seed=1).outcomes == on.outcomes
    off.policy = "predictive, affinity off"
    with_, without = Row.of(on), Row.of(off)
    print(sessions_table([on, off]))
    for row in (with_, without):
        assert row.agents == 6 and row.turns == len(trace) and row.unserved == 0
    assert with_.cached_later >= 0.85
    assert without.cached_later <= with_.cached_later - 0.2
    assert with_.ttft_later_p50 < 0.25 * without.ttft_later_p50
    assert with_.broken <= 0.1 * with_.kept and without.broken >= 0.4 * without.kept
    assert with_.missed < without.missed / 3
    assert on.cold_loads == off.cold_loads == 0  # both replicas activated at start


def test_sessions_beyond_the_slots_keep_their_caches_in_the_host_tier() -> None:
    # One replica of two slots, six sessions at once: without the host tier a
    # session's slot has gone to another by its next turn.
    trace = generate(agent_fleet(slots=2, host_cache_mb=0, neurons=1), AGENTS)
    tier = replay(agent_fleet(slots=2, host_cache_mb=4096, neurons=1), trace, "predictive")
    bare = replay(agent_fleet(slots=2, host_cache_mb=0, neurons=1), trace, "predictive")
    bare.policy = "predictive, no host tier"
    with_, without = Row.of(tier), Row.of(bare)
    print(sessions_table([tier, bare]))
    # Every later turn found the whole previous conversation cached.
    assert with_.missed == 0 and with_.cached_later >= 0.95
    assert sum(o.restored for o in tier.outcomes) > 0 and with_.restored_later > 0.2
    # The gateway's pollers read the fake neuron's prompt cache as a real one's.
    assert 0.5 * sum(o.cached for o in tier.outcomes) < tier.reported_cached_tokens
    assert tier.reported_cached_tokens <= sum(o.cached for o in tier.outcomes)
    assert without.missed > with_.turns / 4 and without.cached_later < 0.85
    assert sum(o.restored for o in bare.outcomes) == 0 and without.restored_later == 0
    assert with_.ttft_later_p50 < without.ttft_later_p50


def test_a_session_whose_replica_is_evicted_loses_its_cache() -> None:
    # One GPU fits one model: a request for another model evicts the agent's
    # (idle during its think time); the next turn reloads it and finds nothing.
    fleet = agent_fleet(slots=2, host_cache_mb=4096, neurons=1)
    fleet.neurons[0].activate = []
    fleet.models.append(SimModelSpec("other", vram_mb=6000, slots=1))
    turn0 = (("system-0", 3000), ("document-0", 1500), ("user-0-0", 100))
    turn1 = (*turn0, ("answer-0-0", 50), ("user-0-1", 100))
    turn2 = (*turn1, ("answer-0-1", 50), ("user-0-2", 100))
    agent = [
        TraceRequest(0.0, "m", cache.length(p), 50, session=0, think=60.0, prompt=p, key="s")
        for p in (turn0, turn1, turn2)
    ]
    for n, request in enumerate(agent):
        agent[n] = attrs.evolve(request, answer=f"answer-0-{n}", think=0.0 if n == 0 else 60.0)
    other = TraceRequest(30.0, "other", prompt_tokens=400, max_tokens=20, session=1)
    result = replay(fleet, sorted([*agent, other], key=lambda r: r.t), "predictive")
    turns = [o for o in result.outcomes if o.request.agent]
    assert [o.turn for o in turns] == [0, 1, 2]
    # Loads: m, other (evicting m), m again (evicting other).
    assert result.cold_loads == 3 and result.evictions == 2
    assert [o.cached for o in turns] == [0, 0, cache.length(turn1) + 50]
    # What the evictions threw away: m's slot (turn 0 and its answer), then
    # other's (its prompt and answer).
    assert result.dropped_tokens == cache.length(turn0) + 50 + 400 + 20
    # The router forgot the evicted replica's prefixes: turn 1 was new to it.
    assert result.affinity["new"] == 2 and result.affinity["kept"] == 1
    row = Row.of(result)
    assert row.missed == 1 and row.cached_later == pytest.approx(
        (cache.length(turn1) + 50) / (cache.length(turn1) + cache.length(turn2))
    )


def test_command_line_compares_affinity_on_agent_traces(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[neurons]]\nname = "a"\ngpus = [10000]\nactivate = ["m"]\n'
        '[[neurons]]\nname = "b"\ngpus = [10000]\nactivate = ["m"]\n'
        '[[models]]\nid = "m"\nvram_mb = 6000\ntokens_per_second = 50\n'
        "prefill_tokens_per_second = 1000\nslots = 2\nhost_cache_mb = 0\n"
    )
    trace = tmp_path / "agents.jsonl"
    assert (
        trace_main(
            [
                *("--fleet", str(fleet), "--out", str(trace), "--sessions-per-minute", "0"),
                *("--agents", "4", "--turns", "4", "--agent-spread", "30", "--duration", "900"),
            ]
        )
        == 0
    )
    assert "agent turns" in capsys.readouterr().err
    args = ["--fleet", str(fleet), "--trace", str(trace), "--policy", "predictive"]
    assert main([*args, "--compare", "affinity=false", "--floor", "0", "--jobs", "1"]) == 0
    out = capsys.readouterr().out.split("\n\n")
    assert len(out) == 2
    sessions_rows = out[1].splitlines()
    assert sessions_rows[0].split()[:4] == ["policy", "sessions", "turns", "cached"]
    assert [r.split()[:3] for r in sessions_rows[2:]] == [
        ["predictive", "4", sessions_rows[2].split()[2]],
        ["predictive", "affinity=False", "4"],
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text(fleet.read_text().replace('activate = ["m"]', 'activate = ["x"]', 1))
    assert main(["--fleet", str(bad), "--trace", str(trace)]) == 2


def test_agent_turns_that_call_a_tool(tmp_path: pathlib.Path) -> None:
    fleet = FleetFile.read(FLEET)
    settings = attrs.evolve(AGENTS, agents=60, turns=20, tool_share=0.7)
    trace = generate(fleet, settings)
    words = generate(fleet, attrs.evolve(settings, tool_share=0.0))
    # The same conversations (tool calls draw from a generator of their own) ...
    assert [(r.session, r.prompt) for r in sorted(trace, key=lambda r: (r.session, r.t))] == [
        (r.session, r.prompt) for r in sorted(words, key=lambda r: (r.session, r.t))
    ]
    assert not any(r.tool for r in words)
    tool_times = []
    for group in sessions([Outcome(r) for r in trace]):
        turns = [o.request for o in group]
        # ... a session's last answer in words ...
        assert not turns[-1].tool
        for before, after in itertools.pairwise(turns):
            if before.tool:
                tool_times.append(after.think)
    # ... most others call a tool, and the result follows after the tool's run:
    # log-normal, median 2 s, a heavy tail.
    later = len(trace) - len(sessions([Outcome(r) for r in trace]))
    share = sum(r.tool for r in trace) / later
    assert 0.6 < share < 0.8
    assert 1.5 < statistics.median(tool_times) < 2.7
    assert max(tool_times) > 10 * statistics.median(tool_times)
    # The line says so, and reads back; a line without it is an answer in words.
    path = tmp_path / "trace.jsonl"
    with path.open("w") as f:
        write(trace, f)
    assert read_trace(path) == sorted(trace, key=lambda r: r.t)
    lines = path.read_text().splitlines()
    assert any('"tool": true' in line for line in lines)
    assert not any('"tool": false' in line for line in lines)
