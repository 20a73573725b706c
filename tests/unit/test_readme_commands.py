"""The README's shell commands exist as written: make targets in the Makefile, executables in the venv, and every
--option they show in that command's own --help."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Commands whose second word is a subcommand with its own --help.
SUBCOMMANDS = {"mtl-client": {"health", "info", "predict", "evaluate"}}


def readme_commands() -> list[str]:
    """Each line of the README's bash blocks, comments and the `$ ` prompt removed."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.split("  #")[0].split(" # ")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def program_and_help(words: list[str]) -> tuple[list[str], list[str]]:
    """The words that name the program (and its subcommand), and the argv that prints their --help."""
    if words[0] == ".venv/bin/python" and words[1] == "-m":
        return words[:3], [sys.executable, "-m", words[2], "--help"]
    name = Path(words[0]).name
    program = words[:2] if len(words) > 1 and words[1] in SUBCOMMANDS.get(name, ()) else words[:1]
    return program, [str(BIN / name), *program[1:], "--help"]


COMMANDS = [line for line in readme_commands() if line.startswith((".venv/bin/", "make "))]


def test_the_readme_shows_both_commands_and_the_tools():
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert any(line.startswith(".venv/bin/mtl-client predict") for line in COMMANDS)
    assert any(line.startswith(".venv/bin/mtl-build") for line in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_exists_with_its_options(line):
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))
    if words[0] == "make":
        assert words[1] in make_targets(), f"README runs `make {words[1]}`, which the Makefile lacks"
        return
    program, help_argv = program_and_help(words)
    assert Path(help_argv[0]).exists(), f"{help_argv[0]} is not installed in this environment"
    shown = subprocess.run(help_argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert shown.returncode == 0, f"{' '.join(help_argv)} failed: {shown.stderr[-500:]}"
    for option in (word.split("=")[0] for word in words[len(program) :] if word.startswith("--")):
        assert re.search(rf"(^|[\s,/]){re.escape(option)}\b", shown.stdout), f"{' '.join(program)} has no {option}"
