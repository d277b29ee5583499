"""Module boundaries the code must keep: engines stay out of the neuron's
internals, and the neuron's request path stays in short functions."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINES = [ROOT / "plugins" / "llamacpp" / "cortex_llamacpp", ROOT / "plugins" / "ctransformers"]
#: Modules engines import besides cortex.harness: public, neuron-free.
PUBLIC = [ROOT / "cortex" / "toolcalls.py", ROOT / "cortex" / "chat_template.py"]


def imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def engine_modules() -> list[pathlib.Path]:
    return sorted(p for root in ENGINES for p in root.rglob("*.py"))


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_engines_import_nothing_from_the_neuron(path: pathlib.Path) -> None:
    inside = sorted(
        n for n in imported(path) if n == "cortex.neuron" or n.startswith("cortex.neuron.")
    )
    assert not inside, f"{path.relative_to(ROOT)} imports neuron internals: {inside}"


@pytest.mark.parametrize("path", PUBLIC, ids=lambda p: p.name)
def test_public_engine_modules_import_only_neuron_free_helpers(path: pathlib.Path) -> None:
    inside = {n for n in imported(path) if n.startswith("cortex.neuron")}
    # stops.partial_suffix is a pure string helper the parser shares.
    assert inside <= {"cortex.neuron.stops", "cortex.neuron.stops.partial_suffix"}


#: The request path: the app's routes, the session prologue, the stream builders.
REQUEST_PATH = [
    ROOT / "cortex" / "neuron" / "app.py",
    ROOT / "cortex" / "neuron" / "session.py",
    ROOT / "cortex" / "wire" / "openai_stream.py",
]
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("path", REQUEST_PATH, ids=lambda p: p.name)
def test_request_path_functions_are_short(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: split {', '.join(long)}"


SCHEDULER = sorted((ROOT / "cortex" / "gateway" / "scheduler").glob("*.py"))
#: What deciding must not reach for: the event loop, the network, the router.
ACTING = ("trio", "httpx", "cortex.gateway.upstream", "cortex.gateway.router")


@pytest.mark.parametrize("path", SCHEDULER, ids=lambda p: p.name)
def test_the_scheduler_decides_without_trio_or_io(path: pathlib.Path) -> None:
    reached = sorted(
        n for n in imported(path) if any(n == a or n.startswith(a + ".") for a in ACTING)
    )
    assert not reached, f"{path.relative_to(ROOT)} imports {reached}"


def test_the_router_decides_and_the_loader_acts() -> None:
    source = (ROOT / "cortex" / "gateway" / "router.py").read_text()
    # No task of its own and no call to a neuron: loads go to its Loader.
    for acting in ("start_soon", "open_nursery", "self.api.", "sleep"):
        assert acting not in source, f"router.py: {acting}"
