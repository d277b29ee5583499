"""The trace-replay instrument: fleet files, traces, fake neurons, and a short replay
checked against the baseline policy."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import trio

from cortex.errors import ConfigError, ModelNotFound, Unavailable
from cortex.sim.__main__ import main
from cortex.sim.fleet import FleetFile, SimModelSpec, SimNeuronSpec
from cortex.sim.neuron import SimNeuron
from cortex.sim.replay import read_trace, replay, thrash_count
from cortex.sim.report import Row, percentile, table
from cortex.sim.trace import TraceSettings, generate, working_set, write

FLEET = pathlib.Path(__file__).resolve().parent.parent / "contrib" / "sim" / "fleet.toml"


def test_example_fleet_file() -> None:
    fleet = FleetFile.read(FLEET)
    assert len(fleet.neurons) == 3 and fleet.memory_mb == 96 * 1024
    assert sum(m.vram_mb for m in fleet.models) > 2 * fleet.memory_mb
    config = fleet.gateway_config("fixed")
    assert config.routing.policy == "fixed" and config.routing.max_wait == 300
    assert {m.id for m in fleet.catalogue().models} == {m.id for m in fleet.models}


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
        '{"t": 5, "model": "b", "prompt_tokens": 10, "max_tokens": 3}\n\n{"t": 1, "model": "a"}\n'
    )
    requests = read_trace(path)
    assert [(r.t, r.model) for r in requests] == [(1.0, "a"), (5.0, "b")]
    assert requests[0].prompt_tokens == 500 and requests[1].max_tokens == 3
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
    assert neuron.resident == {} and [what for _, what, _ in neuron.log] == ["load", "unload"]


def test_thrash_count_and_percentiles() -> None:
    logs = [(0, "load", "a"), (10, "unload", "a"), (100, "load", "a"), (200, "unload", "a")]
    assert thrash_count([*logs, (900, "load", "a")], 600) == 1
    assert thrash_count([*logs, (700, "load", "a")], 600) == 2
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile(list(range(1, 101)), 99) == 99


def test_short_replay_against_the_baseline() -> None:
    fleet = FleetFile.read(FLEET)
    trace = generate(fleet, TraceSettings(duration=900, seed=2))
    max_wait = fleet.gateway_config("predictive").routing.max_wait
    fixed = replay(fleet, trace, "fixed")
    predictive = replay(fleet, trace, "predictive")
    patient = replay(fleet, trace, "predictive", routing={"patience": 1.0})
    holding = replay(fleet, trace, "predictive", routing={"patience": 4.0})
    base, ours, fewer, fewest = (Row.of(r) for r in (fixed, predictive, patient, holding))
    print(table([fixed, predictive, patient, holding]))
    for row in (base, ours, fewer, fewest):
        assert row.requests == len(trace) and row.cold_loads > 0
    # Every request served, none waited at the gateway past the maximum.
    for row in (ours, fewer, fewest):
        assert row.unserved == 0 and row.wait_max <= max_wait
    # Measured on this trace (fixed ~80 loads, p99 ~26 s; predictive ~86,
    # ~18.5 s; patience 1: ~62, ~38 s; patience 4: ~52, ~55 s): a shorter
    # tail at about the same loads, or fewer loads bought with waiting.
    # (0.69-0.79 over repeated runs: trio runs ready tasks in random order.)
    assert ours.ttft_p99 < 0.9 * base.ttft_p99
    assert ours.cold_loads <= 1.2 * base.cold_loads
    assert fewer.cold_loads < 0.85 * base.cold_loads and fewer.thrash < base.thrash
    assert fewest.cold_loads < 0.75 * base.cold_loads
    assert predictive.decisions["queued"] > 0 and fixed.decisions["queued"] == 0
    # Half the baseline's loads (~40) is out of reach for any router that
    # serves requests as they come: contrib/sim/bound.py, knowing the whole
    # trace and pooling the fleet's memory, needs 53 (test below). Getting
    # under it takes holding requests back, which costs the p99.
    assert base.cold_loads / 2 < CLAIRVOYANT_SHORT
    assert fewest.ttft_p99 > base.ttft_p99


#: contrib/sim/bound.py's busy bound for the short replay's trace.
CLAIRVOYANT_SHORT = 53


def test_clairvoyant_bound_on_the_short_trace(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("scipy")
    path = FLEET.parent / "bound.py"
    spec = importlib.util.spec_from_file_location("bound", path)
    assert spec is not None and spec.loader is not None
    bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound)
    out = tmp_path / "short.jsonl"
    with open(out, "w") as f:
        write(generate(FleetFile.read(FLEET), TraceSettings(duration=900, seed=2)), f)
    models, memory, trace = bound.read(str(FLEET), str(out))
    assert bound.bound(models, memory, trace, busy=True) == pytest.approx(CLAIRVOYANT_SHORT)
    instant = bound.bound(models, memory, trace, busy=False)
    relaxed = bound.bound(models, memory, trace, busy=False, integral=False)
    assert len({r["model"] for r in trace}) <= relaxed <= instant <= CLAIRVOYANT_SHORT


def test_command_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [{"t": i * 2.0, "model": "Qwen/Qwen3-0.6B", "max_tokens": 20} for i in range(5)]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plot = tmp_path / "plot.png"
    args = ["--fleet", str(FLEET), "--trace", str(trace), "--policy", "predictive"]
    code = main([*args, "--policy", "static", "--plot", str(plot)])
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
    assert main([*args, "--compare", "patience=-1"]) == 2
    capsys.readouterr()
    assert main([*args, "--compare", "patience=1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [" ".join(row.split()[:2]) for row in rows] == ["predictive 5", "predictive patience=1"]
