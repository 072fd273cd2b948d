"""docs/cli.md must be exactly what scripts/gen_cli_docs.py generates from the command now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from policyd.cli import cli
from scripts import gen_cli_docs
from scripts.gen_cli_docs import OUT, ROOT, render


def test_cli_reference_matches_the_command_tree() -> None:
    assert OUT.exists(), "docs/cli.md is missing: run `make docs`"
    assert OUT.read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_cli_reference_does_not_depend_on_the_terminal_width(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = render()
    monkeypatch.setenv("COLUMNS", "40")
    assert render() == expected


def test_cli_reference_has_a_section_for_every_command() -> None:
    text = render()
    for name, command in cli.commands.items():
        assert f" policyd {name}\n" in text
        for sub in getattr(command, "commands", {}):
            assert f" policyd {name} {sub}\n" in text


def test_cli_reference_documents_every_exit_code() -> None:
    text = render()
    for code in ("0", "1", "2", "3", "4", "5"):
        assert f"\n| {code} | " in text


def test_generator_check_mode_passes_on_the_checked_in_reference() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_cli_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "50"},
    )
    assert result.returncode == 0, result.stderr


def test_generator_check_mode_fails_on_a_stale_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text("# an old reference\n")
    monkeypatch.setattr(gen_cli_docs, "OUT", stale)
    assert gen_cli_docs.main(["--check"]) == 1
    assert "run `make docs`" in capsys.readouterr().err
    assert stale.read_text() == "# an old reference\n"


def test_generator_writes_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "docs" / "cli.md"
    monkeypatch.setattr(gen_cli_docs, "OUT", out)
    assert gen_cli_docs.main([]) == 0
    assert out.read_text() == render()
