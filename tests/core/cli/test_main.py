"""``lesionlab`` (core.cli.main): one entry point that lists every command and hands each its own arguments."""

from __future__ import annotations

import importlib

import pytest

from core.cli.main import COMMANDS, main
from tests.conftest import run_cli


def test_every_listed_command_is_a_module_with_a_main():
    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_help_lists_the_commands_and_an_unknown_one_is_refused(capsys):
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    assert main([]) == 2  # no command: the usage, and a failing status for scripts
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.integration
def test_python_dash_m_core_runs_a_command_with_its_own_arguments():
    done = run_cli("core", "predict", "--help")  # a real process, as `lesionlab predict --help`
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lesionlab predict") and "--tta" in done.stdout
