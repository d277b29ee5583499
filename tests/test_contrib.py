"""contrib/: the systemd units, the RPM spec and the sessions and idle-slots benches.

The units are parsed for the keys operators rely on (hardening, the drain on
SIGTERM, GPU access) and, where systemd-analyze exists, verified by systemd
itself; the spec is parsed by ``rpmspec -P`` where rpm is installed. The
sessions bench runs at a tiny size over two neurons behind a gateway (with
llama-server beside it only where ``CORTEX_LLAMA_SERVER`` names a binary),
and the idle-slots bench's steady state at a tiny size, so they cannot rot
unseen.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cortex import config as cfg
from cortex.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "contrib" / "systemd"
SPEC = ROOT / "contrib" / "rpm" / "cortex.spec"
SESSIONS_BENCH = ROOT / "contrib" / "bench" / "sessions.py"
IDLE_SLOTS_BENCH = ROOT / "contrib" / "bench" / "idle_slots.py"
HEAD_OF_LINE_BENCH = ROOT / "contrib" / "bench" / "head_of_line.py"
UNITS = {"neuron": "cortex-neuron.service", "gateway": "cortex-gateway.service"}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}}; keys may repeat (DeviceAllow=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        assert not value.endswith("\\"), f"{path.name}:{number}: keep values on one line"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values, f"{key}= is missing"
    return values[-1]


def grace_period(role: str) -> float:
    """The larger of the default and the example config's grace_period."""
    section = cfg.NeuronSection if role == "neuron" else cfg.GatewaySection
    example = "neuron.toml" if role == "neuron" else "cortex.toml"
    configured = tomllib.loads((ROOT / "etc" / example).read_text()).get(role, {})
    return max(section().grace_period, configured.get("grace_period", 0))


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_is_hardened_and_drains(role: str) -> None:
    unit = parse_unit(SYSTEMD / UNITS[role])
    service = unit["Service"]
    assert "WantedBy" in unit["Install"]
    expected = {
        "User": "cortex",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    assert {key: one(service, key) for key in expected} == expected
    # systemd kills with SIGKILL after TimeoutStopSec: the drain must fit before it.
    assert float(one(service, "TimeoutStopSec")) > grace_period(role) + 10
    assert "2" in one(service, "RestartPreventExitStatus").split()


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_runs_the_role_with_a_packaged_config(role: str) -> None:
    service = parse_unit(SYSTEMD / UNITS[role])["Service"]
    argv = shlex.split(one(service, "ExecStart"))
    assert argv[0] == "/usr/bin/cortex"
    args = build_parser().parse_args(argv[1:])
    assert args.role == role
    for path in (args.config, getattr(args, "models", None)):
        if path is not None:
            assert path.startswith("/etc/cortex/")
            assert (ROOT / "etc" / Path(path).name).is_file(), f"etc/ has no {Path(path).name}"


def test_neuron_unit_reaches_gpus_and_model_storage() -> None:
    service = parse_unit(SYSTEMD / UNITS["neuron"])["Service"]
    assert "PrivateDevices" not in service
    devices = [value.split()[0] for value in service["DeviceAllow"]]
    assert "char-nvidia*" in devices and "/dev/nvidiactl" in devices
    assert all(value.split()[1] == "rw" for value in service["DeviceAllow"])
    assert "/var/lib/cortex" in " ".join(service["ReadWritePaths"]).split()
    neuron_toml = tomllib.loads((ROOT / "etc" / "neuron.toml").read_text())
    for directory in neuron_toml["neuron"].get("model_dirs", []):
        assert directory.startswith("/var/lib/cortex/"), f"{directory} is not writable"
    assert {"video", "render"} <= set(one(service, "SupplementaryGroups").split())


def test_neuron_unit_restarts_after_a_crash() -> None:
    """An engine that segfaults kills the neuron; systemd must bring it back.

    ``Restart=on-failure`` restarts on a non-zero exit and on death by an
    unclean signal (SIGSEGV, SIGILL, SIGABRT, SIGKILL); the unit must not list
    those signals as a success or as a reason not to restart.
    """
    service = parse_unit(SYSTEMD / UNITS["neuron"])["Service"]
    assert one(service, "Restart") == "on-failure"
    assert 0 < float(one(service, "RestartSec")) <= 30
    crashes = {"SIGSEGV", "SIGILL", "SIGABRT", "SIGBUS", "SIGKILL", "SEGV", "ILL", "ABRT", "KILL"}
    for key in ("RestartPreventExitStatus", "SuccessExitStatus"):
        listed = {word for value in service.get(key, []) for word in value.split()}
        assert not listed & crashes, f"{key}= keeps a crashed neuron down"
    # Its last words (faulthandler's stacks, on stderr) must reach the journal.
    assert service.get("StandardError", ["journal"])[-1] in ("journal", "inherit")


def test_gateway_unit_has_no_devices_and_reloads() -> None:
    service = parse_unit(SYSTEMD / UNITS["gateway"])["Service"]
    assert one(service, "PrivateDevices") == "yes"
    assert "-HUP" in one(service, "ExecReload")


def test_sysusers_and_tmpfiles_agree_with_the_units() -> None:
    users = [
        line.split()
        for line in (SYSTEMD / "cortex.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert [(u[0], u[1]) for u in users] == [("u", "cortex")]
    assert "/var/lib/cortex" in users[0]
    tmpfiles = (SYSTEMD / "cortex.tmpfiles").read_text()
    assert "d /var/lib/cortex/models" in " ".join(tmpfiles.split())


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; see contrib/README.md for the manual check")
    # verify wants ExecStart= to exist: point copies of the units at this venv's cortex.
    cortex = Path(sys.executable).with_name("cortex")
    if not cortex.exists():
        pytest.skip(f"{cortex} is not installed (pip install -e .)")
    for name in UNITS.values():
        text = (SYSTEMD / name).read_text().replace("/usr/bin/cortex", str(cortex))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *UNITS.values()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_rpm_spec_parses() -> None:
    rpmspec = shutil.which("rpmspec")
    if rpmspec is None:
        pytest.skip("rpmspec is not installed (apt-get install rpm)")
    for extra in ([], ["--without", "llama_cpp_requires"]):
        result = subprocess.run(
            [rpmspec, "-P", *extra, str(SPEC)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
    queried = subprocess.run(
        [rpmspec, "-q", "--qf", "%{NAME}\n", str(SPEC)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert queried.stdout.split() == ["cortex", "cortex-llamacpp"]
    parsed = result.stdout
    for installed in ("cortex-neuron.service", "cortex-gateway.service", "man1/cortex.1"):
        assert installed in parsed
    for config in ("cortex.toml", "neuron.toml", "models.toml"):
        assert f"%config(noreplace) %attr(0640,root,cortex) /etc/cortex/{config}" in parsed


@pytest.mark.slow
def test_sessions_bench_over_two_neurons(tmp_path: Path, smollm2_path: Path) -> None:
    """Two sessions, two turns, each routing: the table, the JSON, every turn accounted for."""
    out = tmp_path / "sessions.json"
    sessions, turns = 2, 2
    command = [
        sys.executable, str(SESSIONS_BENCH), "--sessions", str(sessions), "--turns", str(turns),
        "--system", "160", "--document", "40", "--max-tokens", "2", "--tiers", "host",
        "--neurons", "2", "--n-ctx", "1024", "--kv-cells", "4096", "--json", str(out),
        "--routing", "affinity", "least-loaded", "no-affinity",
    ]  # fmt: skip
    modes = ["affinity, host", "least-loaded, host", "no-affinity, host"]
    llama_server = os.environ.get("CORTEX_LLAMA_SERVER")
    if llama_server:
        command += ["--llama-server", llama_server]
        modes.append("llama-server")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.index("  N  mode") :].splitlines()
    assert [line[5:27].strip() for line in table[1:]] == modes

    runs = json.loads(out.read_text())
    assert [run["row"]["mode"] for run in runs] == modes
    for run in runs:
        row, done = run["row"], run["turns"]
        assert sorted((t["session"], t["turn"]) for t in done) == [
            (s, t) for s in range(sessions) for t in range(turns)
        ]
        for s in range(sessions):
            ordered = sorted((t for t in done if t["session"] == s), key=lambda t: t["turn"])
            prompts = [t["prompt_tokens"] for t in ordered]
            assert prompts[0] > 160 and all(a < b for a, b in itertools.pairwise(prompts))
        # Every request counted at a neuron, and both neurons used: two
        # sessions at once never share one replica while the other is idle.
        assert sum(row["per_neuron"]) == sessions * turns
        if row["mode"] != "llama-server":
            assert len(row["per_neuron"]) == 2 and min(row["per_neuron"]) > 0
            assert sum(row["affinity"].values()) == sessions * turns
        # Both neurons hold the shared system prompt after the first turns; a
        # later turn reads it from cache unless another request seated at the
        # same moment took the slot holding it: at least one of two does.
        later = [t for t in done if t["turn"] > 0]
        assert max(t["cached_tokens"] for t in later) >= 120
        assert row["later"]["cached"] > 0
        assert row["later"]["requests"] == sessions * (turns - 1)


@pytest.mark.slow
def test_idle_slots_bench_steady_state(smollm2_path: Path) -> None:
    """Every row of the steady-state table, and each turn read from its session's slot."""
    command = [
        sys.executable, str(IDLE_SLOTS_BENCH), "--sections", "steady", "--rounds", "1",
        "--parallel", "4", "--busy", "1", "3", "--fill-tokens", "120", "--turn-words", "8",
        "--tokens", "4", "--n-ctx", "512",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.index("TTFT ms") :].splitlines()[1:]
    rows = {line[:44].strip(): line[44:].split() for line in table if line.strip()}
    assert list(rows) == [
        "parallel 1, one session",
        "unified, slots 1 3 at once",
        "per-slot, slots 1 3 at once",
        "unified, slots 0 1 at once",
        "per-slot, slots 0 1 at once",
        "unified, slot 1 alone",
        "per-slot, slot 1 alone",
    ]
    # A turn of 120 cached words and about 12 new ones: the session's own
    # slot answered it, in both layouts (a miss would read 0%).
    for name, (_, _, cached, _, _) in rows.items():
        assert int(cached.rstrip("%")) >= 80, name


@pytest.mark.slow
def test_head_of_line_bench_prints_both_orders_exact(smollm2_path: Path) -> None:
    """Both orders at each ``n_batch``, the short request first under the new one."""
    command = [
        sys.executable, str(HEAD_OF_LINE_BENCH), "--long-words", "200", "--n-batch", "32",
        "--n-ctx", "512", "--parallel", "2", "--check",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.index("short TTFT ms") :].splitlines()[1:]
    rows = {line[:32].strip(): line[32:].split() for line in table if line.strip()}
    assert list(rows) == ["arrival (before), n_batch 32", "fewest left first, n_batch 32"]
    assert all(row[-1] == "yes" for row in rows.values())
    (short_before, long_before), (short_now, long_now) = (
        (float(row[0]), float(row[1])) for row in rows.values()
    )
    # Before, the short request waited for most of the long prompt; now for
    # a chunk of 32 tokens of it.
    assert short_before > long_before / 2
    assert short_now < long_now / 3
