"""Config files, environment overrides, and the one-line errors they give."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cortex import config as cfg
from cortex.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cortex_exits(
    *argv: str, status: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``cortex *argv`` (with ``env`` added to the environment), having exited ``status``."""
    result = subprocess.run(
        [sys.executable, "-m", "cortex", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == status, result.stderr
    return result


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines a run wrote to stderr."""
    return result.stderr.strip().splitlines()


def test_defaults_without_a_file() -> None:
    neuron = cfg.load(cfg.NeuronConfig, None, environ={})
    assert neuron.neuron.listen == "0.0.0.0:13131"
    assert neuron.models == []
    gateway = cfg.load(cfg.GatewayConfig, None, environ={})
    assert gateway.gateway.listen == "0.0.0.0:31313"
    assert gateway.gateway.metrics_listen == "0.0.0.0:31314"


def test_file_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [neuron]
        listen = "127.0.0.1:9000"
        n_ctx_max = 4096
        [[models]]
        id = "Qwen/Qwen3-8B"
        source = "qwen.gguf"
        options = { n_gpu_layers = 10 }
        """,
    )
    env = {
        "CORTEX_NEURON_LISTEN": "127.0.0.1:9001",
        "CORTEX_NEURON_TOKEN": "12345",
        "CORTEX_NEURON_OPEN_HEALTH": "false",
        "CORTEX_NEURON_BLOCKED_HARNESSES": "ctransformers, other",
    }
    loaded = cfg.load(cfg.NeuronConfig, path, environ=env)
    assert loaded.neuron.listen == "127.0.0.1:9001"
    assert loaded.neuron.token == "12345"
    assert loaded.neuron.open_health is False
    assert loaded.neuron.blocked_harnesses == ["ctransformers", "other"]
    assert loaded.neuron.n_ctx_max == 4096
    assert loaded.models[0].options == {"n_gpu_layers": 10}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[neuron]\nlistne = 'x'\n", "neuron: unknown keys ['listne']"),
        ("[neuron]\nn_ctx_max = 'big'\n", "neuron.n_ctx_max"),
        ("[neuron]\nlisten = 'host:port'\n", "port must be a number"),
        ("[[models]]\nsource = 'x'\n", "models"),
        ("not toml = = 1\n", "c.toml"),
    ],
)
def test_bad_files_name_file_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.NeuronConfig, path, environ={})
    assert str(path) in error.value.message
    assert message in error.value.message
    assert "\n" not in error.value.message


def test_bad_environment_value() -> None:
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.GatewayConfig, None, environ={"CORTEX_GATEWAY_POLL_INTERVAL": "soon"})
    assert "gateway.poll_interval" in error.value.message


def test_models_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[models]]
        id = "Qwen/Qwen3-1.7B"
        vram_mb = 2000
        pinned_on = ["a"]
        sampling = { temperature = 0.7, top_k = 20 }
        [aliases]
        "tier/small" = "Qwen/Qwen3-1.7B"
        """,
    )
    models = cfg.load_models(path)
    assert models.aliases == {"tier/small": "Qwen/Qwen3-1.7B"}
    assert models.models[0].sampling == {"temperature": 0.7, "top_k": 20}
    bad = write(tmp_path, '[[models]]\nid = "a"\n[aliases]\nb = "zzz"\n', "m.toml")
    with pytest.raises(ConfigError, match=r"aliases\.b: unknown model .zzz."):
        cfg.load_models(bad)
    wrong = write(tmp_path, '[[models]]\nid = "a"\nsampling = { heat = 1 }\n', "s.toml")
    with pytest.raises(ConfigError, match="unknown sampling keys"):
        cfg.load_models(wrong)


def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[neuron]\nbogus = 1\n")
    result = cortex_exits("--role", "neuron", "--config", str(path))
    assert said(result) == [f"cortex: {path}: neuron: unknown keys ['bogus']"]


def test_example_configs_parse() -> None:
    root = Path(__file__).parent.parent / "etc"
    neuron = cfg.load(cfg.NeuronConfig, root / "neuron.toml", environ={})
    assert neuron.models[0].source == "demo"


def test_errors_from_inside_the_event_loop_are_one_line(tmp_path: Path) -> None:
    missing = cortex_exits(
        *("--role", "gateway", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
        env={"CORTEX_GATEWAY_API_KEYS_FILE": str(tmp_path / "missing")},
    )
    assert said(missing) == [f"cortex: {tmp_path / 'missing'}: No such file or directory"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cortex_exits("--role", "neuron", "--listen", f"127.0.0.1:{port}", status=1)
    assert said(busy)[-1] == (f"cortex: listen 127.0.0.1:{port}: Address already in use")
    assert "Traceback" not in busy.stderr


def test_a_taken_metrics_port_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cortex_exits(
            *("--role", "gateway", "--listen", "127.0.0.1:0"),
            *("--metrics-listen", f"127.0.0.1:{port}"),
            status=1,
        )
    assert said(busy)[-1] == (f"cortex: metrics_listen 127.0.0.1:{port}: Address already in use")


def role_config_error(argv: list[str]) -> str:
    """The ConfigError message of loading the role's config from command line ``argv``."""
    from cortex.cli import build_parser, gateway_config, neuron_config, standalone_config

    load = {"neuron": neuron_config, "gateway": gateway_config, "standalone": standalone_config}
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError) as error:
        load[args.role](args)
    return error.value.message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--role", "neuron", "--listen", "nosuch.invalid"],
            "--listen nosuch.invalid: unknown host",
        ),
        (
            ["--role", "gateway", "--metrics-listen", "nosuch.invalid:1"],
            "--metrics-listen nosuch.invalid:1: unknown host 'nosuch.invalid'",
        ),
        (["--role", "standalone", "--listen", "::1"], "--listen: invalid listen address '::1'"),
        (["--role", "neuron", "--listen", "h:port"], "--listen: invalid listen address 'h:port'"),
    ],
)
def test_a_bad_listen_option_is_a_usage_error(argv: list[str], message: str) -> None:
    assert role_config_error(argv).startswith(message)


def test_an_unknown_listen_host_exits_2() -> None:
    [line] = said(cortex_exits("--role", "neuron", "--listen", "foo"))
    assert line.startswith("cortex: --listen foo: unknown host 'foo' (")
    # From the environment (or a file), the key names it once the server binds.
    setting = cortex_exits("--role", "neuron", env={"CORTEX_NEURON_LISTEN": "nosuch.invalid:0"})
    last = said(setting)[-1]
    assert last.startswith("cortex: listen nosuch.invalid:0: unknown host (")
    assert "Traceback" not in setting.stderr


def test_a_host_alone_takes_the_roles_port() -> None:
    from cortex.cli import build_parser, gateway_config

    args = build_parser().parse_args(["--role", "gateway", "--listen", "127.0.0.1"])
    listen = gateway_config(args)[0].gateway.listen
    assert cfg.parse_listen(listen, default_port=31313) == ("127.0.0.1", 31313)


def test_standalone_neuron_stays_on_loopback() -> None:
    from cortex.standalone import StandaloneConfig

    configured = cfg.load(StandaloneConfig, None, environ={"CORTEX_NEURON_TOKEN": "x"})
    assert configured.neuron.listen == "127.0.0.1:0"
    assert configured.neuron.token == "x"


def test_standalone_listens_on_loopback_unless_told() -> None:
    from cortex.cli import build_parser, standalone_config
    from cortex.standalone import StandaloneConfig

    configured = cfg.load(StandaloneConfig, None, environ={})
    assert configured.gateway.listen == "127.0.0.1:31313"
    assert configured.gateway.metrics_listen == "127.0.0.1:31314"
    args = build_parser().parse_args(["--role", "standalone"])
    config, _ = standalone_config(args)
    assert config.gateway.listen == "127.0.0.1:31313"
    args = build_parser().parse_args(["--role", "standalone", "--listen", "0.0.0.0:8080"])
    assert standalone_config(args)[0].gateway.listen == "0.0.0.0:8080"
    told = cfg.load(StandaloneConfig, None, environ={"CORTEX_GATEWAY_LISTEN": "0.0.0.0:1"})
    assert told.gateway.listen == "0.0.0.0:1"
    # The gateway role itself still serves the network by default.
    assert cfg.GatewaySection().listen == "0.0.0.0:31313"


@pytest.mark.parametrize(
    ("cls", "variable", "value", "message"),
    [
        # What an operator tried: each started, then crashed or misbehaved.
        (
            cfg.GatewayConfig,
            "GATEWAY_POLL_INTERVAL",
            "-1",
            "gateway.poll_interval: must be > 0, got -1",
        ),
        (
            cfg.GatewayConfig,
            "GATEWAY_POLL_INTERVAL",
            "0",
            "gateway.poll_interval: must be > 0, got 0",
        ),
        (
            cfg.GatewayConfig,
            "GATEWAY_LOAD_TIMEOUT",
            "-1",
            "gateway.load_timeout: must be > 0, got -1",
        ),
        (
            cfg.GatewayConfig,
            "GATEWAY_FIRST_BYTE_TIMEOUT",
            "-1",
            "gateway.first_byte_timeout: must be > 0, got -1",
        ),
        (
            cfg.GatewayConfig,
            "GATEWAY_MAX_BODY_BYTES",
            "-1",
            "gateway.max_body_bytes: must be > 0, got -1",
        ),
        (
            cfg.GatewayConfig,
            "GATEWAY_CONNECT_TIMEOUT",
            "0",
            "gateway.connect_timeout: must be > 0, got 0",
        ),
        (
            cfg.NeuronConfig,
            "NEURON_MEMORY_BUDGET_MB",
            "-5",
            "neuron.memory_budget_mb: must be > 0, got -5",
        ),
        (cfg.GatewayConfig, "GATEWAY_GRACE_PERIOD", "-0.5", "gateway.grace_period: must be >= 0"),
        (cfg.GatewayConfig, "GATEWAY_STALL_TIMEOUT", "-1", "gateway.stall_timeout: must be >= 0"),
        (cfg.GatewayConfig, "GATEWAY_IDLE_TIMEOUT", "nan", "must be > 0, got nan"),
        (cfg.GatewayConfig, "ROUTING_SCALE_IN_IDLE", "0", "routing.scale_in_idle: must be > 0"),
        (cfg.GatewayConfig, "ROUTING_PATIENCE_TAIL", "101", "must be > 0 and <= 100, got 101"),
        (cfg.NeuronConfig, "NEURON_SAMPLE_INTERVAL", "0", "neuron.sample_interval: must be > 0"),
        (cfg.NeuronConfig, "NEURON_QUEUE_LIMIT", "-1", "neuron.queue_limit: must be >= 0, got -1"),
    ],
)
def test_numbers_out_of_range_are_errors(
    tmp_path: Path, cls: type, variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        cfg.load(cls, None, environ={f"CORTEX_{variable}": value})
    assert error.value.message.startswith(f"CORTEX_{variable}: ")
    assert message in error.value.message
    section, _, key = variable.lower().partition("_")
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        cfg.load(cls, path, environ={})
    assert error.value.message.startswith(f"{path}: ")
    assert message in error.value.message


def test_the_catalogue_and_neuron_models_have_ranges_too(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\nid = "a"\nsource = "a.gguf"\ndevices = [0, -1]\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.devices: must be >= 0, got -1"):
        cfg.load(cfg.NeuronConfig, path, environ={})
    path = write(
        tmp_path, '[[models]]\nid = "a"\nvram_mb = -1\n[[models]]\nid = "b"\nmin_devices = 0\n'
    )
    with pytest.raises(ConfigError) as error:
        cfg.load_models(path)
    assert error.value.message == (
        f"{path}: models[0].vram_mb: must be >= 0, got -1; "
        "models[1].min_devices: must be > 0, got 0"
    )


def test_an_environment_value_is_named_even_with_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\npoll_interval = 5\n")
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.GatewayConfig, path, environ={"CORTEX_GATEWAY_POLL_INTERVAL": "-1"})
    assert error.value.message == (
        "CORTEX_GATEWAY_POLL_INTERVAL: gateway.poll_interval: must be > 0, got -1"
    )


NUMBERS = (int, float, int | None, float | None, list[int] | None)


@pytest.mark.parametrize(
    "cls",
    [
        cfg.NeuronSection,
        cfg.NeuronModel,
        cfg.GatewaySection,
        cfg.RoutingSection,
        cfg.CatalogModel,
    ],
)
def test_every_numeric_setting_has_a_range(cls: type) -> None:
    import typing

    import attrs

    hints = typing.get_type_hints(cls)
    # priority orders models against each other: any integer is one.
    unbounded = [
        f.name
        for f in attrs.fields(cls)
        if hints[f.name] in NUMBERS
        and not getattr(f.validator, "bounds", None)
        and (cls, f.name) != (cfg.CatalogModel, "priority")
    ]
    assert unbounded == []


def gateway_refuses(variable: str, value: str) -> list[str]:
    """``cortex --role gateway`` with ``variable=value``: what it says, having exited 2."""
    return said(cortex_exits("--role", "gateway", env={variable: value}))


def test_cli_exits_2_on_a_value_out_of_range() -> None:
    assert gateway_refuses("CORTEX_GATEWAY_POLL_INTERVAL", "-1") == [
        "cortex: CORTEX_GATEWAY_POLL_INTERVAL: gateway.poll_interval: must be > 0, got -1"
    ]


def test_two_neurons_with_one_name_are_an_error(tmp_path: Path) -> None:
    from cortex.cli import build_parser, gateway_config

    neuron = '[[neurons]]\nname = "x"\nendpoint = "http://127.0.0.1:{}"\n'
    path = write(tmp_path, neuron.format(1) + neuron.format(2))
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.GatewayConfig, path, environ={})
    assert error.value.message == f"{path}: neurons: duplicate names ['x']"
    path = write(tmp_path, neuron.format(1))
    args = build_parser().parse_args(
        ["--role", "gateway", "--config", str(path), "--neuron", "x=http://127.0.0.1:2"]
    )
    with pytest.raises(ConfigError) as error:
        gateway_config(args)
    assert error.value.message.startswith("--neuron x=http://127.0.0.1:2: a neuron named 'x'")


def test_a_neuron_endpoint_needs_its_scheme(tmp_path: Path) -> None:
    from cortex.cli import build_parser, gateway_config

    path = write(tmp_path, '[[neurons]]\nname = "x"\nendpoint = "127.0.0.1:13131"\n')
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.GatewayConfig, path, environ={})
    assert error.value.message == (
        f"{path}: neurons[0].endpoint: '127.0.0.1:13131' is not an http:// or https:// URL "
        "(http://HOST:PORT)"
    )
    for url in ("10.0.0.2:13131", "ftp://10.0.0.2", "http://"):
        args = build_parser().parse_args(["--role", "gateway", "--neuron", f"big={url}"])
        with pytest.raises(ConfigError) as error:
            gateway_config(args)
        assert error.value.message.startswith(f"--neuron big={url}: {url!r} is not an http://")
    args = build_parser().parse_args(["--role", "gateway", "--neuron", "big=HTTPS://h:1"])
    assert gateway_config(args)[0].neurons[0].endpoint == "HTTPS://h:1"


def test_pinned_on_must_name_a_neuron(tmp_path: Path) -> None:
    from cortex.cli import build_parser, gateway_config, standalone_config

    models = write(tmp_path, '[[models]]\nid = "m"\npinned_on = ["nosuch"]\n', "models.toml")
    for argv in (
        ["--role", "gateway", "--neuron", "gpu1=http://127.0.0.1:1"],
        ["--role", "gateway"],
        ["--role", "standalone"],
    ):
        args = build_parser().parse_args([*argv, "--models", str(models)])
        load = standalone_config if "standalone" in argv else gateway_config
        with pytest.raises(ConfigError) as error:
            load(args)
        assert error.value.message.startswith(f"{models}: models[0].pinned_on: 'm' is pinned on")
        assert "'nosuch', which is not a neuron" in error.value.message
    # The neuron a gateway has by default, and the standalone role's, are named "local".
    models.write_text('[[models]]\nid = "m"\npinned_on = ["local"]\n')
    for role in ("gateway", "standalone"):
        args = build_parser().parse_args(["--role", role, "--models", str(models)])
        load = standalone_config if role == "standalone" else gateway_config
        assert load(args)[1].models[0].pinned_on == ["local"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--role", "gateway", "--model", "x=demo"], "--model: the gateway role loads no models"),
        (
            ["--role", "neuron", "--models", "m.toml"],
            "--models: the neuron role reads no catalogue",
        ),
        (
            ["--role", "neuron", "--neuron", "a=http://127.0.0.1:1"],
            "--neuron: the neuron role routes to no neurons",
        ),
        (
            ["--role", "neuron", "--metrics-listen", "127.0.0.1:0"],
            "--metrics-listen: the neuron role serves /metrics on --listen",
        ),
        (
            ["--role", "standalone", "--neuron", "a=http://127.0.0.1:1"],
            "--neuron: the standalone role has its own local neuron",
        ),
    ],
)
def test_an_option_the_role_would_ignore_is_refused(argv: list[str], message: str) -> None:
    assert role_config_error(argv).startswith(message)


def test_cli_refuses_a_role_option_with_exit_2() -> None:
    [line] = said(cortex_exits("--role", "gateway", "--model", "x=demo"))
    assert line.startswith("cortex: --model: the gateway role loads no models")


def test_a_misspelt_override_is_an_error() -> None:
    from cortex.standalone import StandaloneConfig

    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.NeuronConfig, None, environ={"CORTEX_NEURON_MEMORY_BUGDET_MB": "100"})
    assert error.value.message.startswith(
        "CORTEX_NEURON_MEMORY_BUGDET_MB: neuron: unknown key 'memory_bugdet_mb' (known: "
    )
    assert "memory_budget_mb" in error.value.message
    with pytest.raises(ConfigError, match="CORTEX_ROUTING_PATIENT"):
        cfg.load(StandaloneConfig, None, environ={"CORTEX_ROUTING_PATIENT": "1"})
    # Other variables, and another role's sections, are none of this role's business.
    others = {
        "CORTEX_API_KEY": "k",
        "CORTEX_LLAMA_SERVER": "/usr/bin/llama-server",
        "CORTEX_GATEWAY_POLL_INTRVAL": "1",
        "CORTEX_NEURONS_X": "1",
        "CORTEX_MODELS_X": "1",
    }
    cfg.load(cfg.NeuronConfig, None, environ=others)
    del others["CORTEX_GATEWAY_POLL_INTRVAL"]
    others["CORTEX_NEURON_MEMORY_BUGDET_MB"] = "100"
    cfg.load(cfg.GatewayConfig, None, environ=others)


def test_the_readme_shows_the_real_error_lines(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = "    cortex: /etc/cortex/neuron.toml: neuron.n_ctx_max: "
    [line] = [line for line in readme.splitlines() if line.startswith(shown)]
    path = write(tmp_path, "[neuron]\nn_ctx_max = 'big'\n")
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.NeuronConfig, path, environ={})
    assert line.strip() == "cortex: " + error.value.message.replace(
        str(path), "/etc/cortex/neuron.toml"
    )
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.GatewayConfig, None, environ={"CORTEX_GATEWAY_POLL_INTERVAL": "-1"})
    assert f"    cortex: {error.value.message}\n" in readme


def test_cors_origins_from_a_file_and_the_environment(tmp_path: Path) -> None:
    assert cfg.load(cfg.GatewayConfig, None, environ={}).gateway.cors_origins == []
    path = write(tmp_path, '[gateway]\ncors_origins = ["http://localhost:3000"]\n')
    loaded = cfg.load(cfg.GatewayConfig, path, environ={})
    assert loaded.gateway.cors_origins == ["http://localhost:3000"]
    for value, origins in [
        ("*", ["*"]),
        (
            "http://localhost:3000, https://chat.example",
            ["http://localhost:3000", "https://chat.example"],
        ),
        ('["https://[::1]:8080"]', ["https://[::1]:8080"]),
    ]:
        environ = {"CORTEX_GATEWAY_CORS_ORIGINS": value}
        assert cfg.load(cfg.GatewayConfig, path, environ=environ).gateway.cors_origins == origins


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('cors_origins = ["localhost:3000"]', "'localhost:3000' is not an origin: "),
        ('cors_origins = ["http://localhost:3000/"]', "'http://localhost:3000/' is not an "),
        ('cors_origins = ["https://a.example/app"]', "'https://a.example/app' is not an "),
        # A string is no list (cattrs would take its characters: the keys "k" and "1").
        ('cors_origins = "*"', "expected a list of strings, got '*'"),
        ('api_keys = "k1"', "expected a list of strings, got 'k1'"),
    ],
)
def test_cors_origins_must_be_origins(tmp_path: Path, line: str, reason: str) -> None:
    path = write(tmp_path, f"[gateway]\n{line}\n")
    with pytest.raises(ConfigError) as error:
        cfg.load(cfg.GatewayConfig, path, environ={})
    key = line.split(" ")[0]
    assert error.value.message.startswith(f"{path}: gateway.{key}: {reason}")


def test_cli_exits_2_on_a_bad_cors_origin() -> None:
    assert gateway_refuses("CORTEX_GATEWAY_CORS_ORIGINS", "http://localhost:3000/") == [
        "cortex: CORTEX_GATEWAY_CORS_ORIGINS: gateway.cors_origins: 'http://localhost:3000/' "
        'is not an origin: write SCHEME://HOST[:PORT] (no path, no trailing slash), or "*" for any'
    ]
