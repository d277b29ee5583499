"""The man page: complete, current, and clean to ``man``."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cortex import manpage
from cortex.cli import build_parser

PAGE = Path(__file__).resolve().parent.parent / "man" / "cortex.1"
REGENERATE = "python -m cortex.manpage man/cortex.1"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


def _missing(parser: argparse.ArgumentParser, page: str) -> list[str]:
    """Options, roles and subcommands of ``parser`` that ``page`` does not document."""
    missing = []
    for each in _parsers(parser):
        for action in each._actions:
            for flag in action.option_strings:
                if f"\\fB{manpage.escape(flag)}\\fR" not in page:
                    missing.append(f"{each.prog} {flag}")
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if f'.SS "{manpage.escape(sub.prog)}"' not in page:
                        missing.append(f"command {name}")
    for role in manpage._role_choices(parser):
        if f".B {role}\n" not in page:
            missing.append(f"role {role}")
    return missing


def test_committed_page_documents_every_option() -> None:
    assert PAGE.is_file(), f"{PAGE} is missing: run {REGENERATE}"
    assert _missing(build_parser(), PAGE.read_text()) == []


def test_committed_page_is_current() -> None:
    assert PAGE.read_text() == manpage.render(), f"man/cortex.1 is stale: run {REGENERATE}"


def test_generator_follows_the_parser() -> None:
    parser = build_parser()
    parser.add_argument("--brand-new", metavar="THING", help="an option added later")
    group = parser.add_argument_group("neuron extras")
    group.add_argument("--flag-only", action="store_true", help="a switch")
    page = manpage.render(parser)
    assert _missing(parser, page) == []
    assert _missing(parser, manpage.render()) == ["cortex --brand-new", "cortex --flag-only"]
    assert manpage.render() == manpage.render()


def test_an_undescribed_role_fails_generation() -> None:
    parser = argparse.ArgumentParser(prog="cortex")
    parser.add_argument("--role", choices=("neuron", "oracle"))
    with pytest.raises(LookupError, match="oracle"):
        manpage.render(parser)


def test_escape() -> None:
    assert manpage.escape("--listen a\\b") == "\\-\\-listen a\\eb"
    assert manpage.escape(".starts with a dot\n'and a quote") == (
        "\\&.starts with a dot\n\\&'and a quote"
    )


def test_man_renders_without_warnings() -> None:
    man = shutil.which("man")
    if man is None:
        pytest.fail("man(1) is not installed (apt-get install man-db); CI installs it")
    env = dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    result = subprocess.run(
        [man, "--warnings", "-l", str(PAGE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "SIGNALS" in result.stdout and "EXIT STATUS" in result.stdout


def test_reload_is_documented_as_the_readme_says() -> None:
    # README, POST /admin/reload: SIGHUP and it both re-read api_keys_file too,
    # all or nothing.
    page = manpage.render()
    signals = page.split(".B SIGHUP\n", 1)[1].split(".SH", 1)[0]
    for words in ("api_keys_file", "POST /admin/reload", "all or nothing", "invalid_catalogue"):
        assert words in signals, words
    keys_file = page.split("\\fBapi_keys_file\\fR", 1)[1].split(".TP", 1)[0]
    assert "SIGHUP" in keys_file and "POST /admin/reload" in keys_file
    assert "all or nothing" in keys_file
