"""`dispatch demo` end to end: real coordinator and worker subprocesses on loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dispatchnet.demo import run_demo


async def test_demo_runs_all_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_demo() == 0

    out = capsys.readouterr().out
    for header in (
        "Scenario 1, public fast LLM:",
        "Scenario 2, public cheap task:",
        "Scenario 3, private task:",
    ):
        assert header in out
    assert "ran on the paired worker seeker-1: ok" in out
    llm = out.split("Scenario 1", 1)[1].split("Scenario 2", 1)[0]
    assert "tokens   " in llm and "desktop-1" in llm  # streamed, and run by the desktop
    summary = out.split("Summary", 1)[1]
    for scenario in ("public fast LLM", "public cheap task", "private task"):
        row = next(line for line in summary.splitlines() if line.strip().startswith(scenario + " "))
        assert "COMPLETED" in row
        assert row.rstrip().endswith("valid")
    assert out.count("-> exit 0") == 3
    assert "All scenarios completed with valid receipts." in out

    scratch = re.search(r"scratch space: (\S+),", out)
    assert scratch is not None
    assert not Path(scratch.group(1)).exists()
