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
