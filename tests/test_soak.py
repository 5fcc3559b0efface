"""Short soak (issue 5): 4 concurrent coordinators, 40 small jobs, 2 workers; exact, no resource growth."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def load_soak() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
    spec = importlib.util.spec_from_file_location("rmidl_soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
def test_short_soak_is_exact_and_does_not_grow() -> None:
    soak = load_soak()
    result = soak.run_soak(jobs=40, coordinators=4, workers=2)
    assert result["worst_relative_error"] <= 1e-5
    assert sum(result["tasks_done"].values()) >= 40
    assert soak.over_bounds(result) == []


@pytest.mark.timeout(240)
def test_short_load_test_with_a_worker_killed_and_one_paused_is_exact_and_leaks_nothing() -> None:
    soak = load_soak()
    result = soak.run_soak(jobs=60, coordinators=4, workers=3, faults=True, pause_s=3.0)
    assert result["worst_relative_error"] <= 1e-5
    assert [event.split()[:2] for event in result["faults"]] == [["w1", "killed"], ["w2", "paused"],
                                                                 ["w2", "resumed"]]
    assert set(result["growth"]) == {"w2", "w3"}  # the survivors, the paused one included
    assert soak.over_bounds(result) == []  # no growth after warm-up, nothing left in /dev/shm
