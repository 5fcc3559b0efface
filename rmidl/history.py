"""What rmidl.train records: per-epoch loss and accuracies, per-step phase timings and bytes moved."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["PHASES", "EpochRecord", "History", "StepRecord"]

PHASES = ("send", "compute", "gather", "reduce", "update")
"""A step's phases, as in the paper's printout: send weights, compute shards, gather parts, reduce, update."""


@dataclass(slots=True)
class StepRecord:
    """One step: its epoch (1-based) and number over the run, samples, seconds per phase, bytes moved."""

    epoch: int
    number: int
    samples: int
    send: float
    compute: float
    gather: float
    reduce: float
    update: float
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def seconds(self) -> float:
        return self.send + self.compute + self.gather + self.reduce + self.update


@dataclass(slots=True)
class EpochRecord:
    """One epoch (1-based): mean training loss and accuracy as its steps computed them (the running
    figures, free of an extra pass), validation loss and accuracy at its end (None without a validation
    set), and its wall seconds (validation included)."""

    epoch: int
    loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    steps: int
    samples: int


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@dataclass
class History:
    """The records of one training run, with the run's settings; `table()` prints them per epoch."""

    settings: dict[str, Any] = field(default_factory=dict)
    epochs: list[EpochRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)

    def series(self, name: str) -> list[Any]:
        """One EpochRecord field over the epochs, e.g. series("val_accuracy") for a plot."""
        names = [f.name for f in fields(EpochRecord)]
        if name not in names:
            raise KeyError(f"{name!r} is not an epoch field ({', '.join(names)})")
        return [getattr(record, name) for record in self.epochs]

    def phase_means(self, epoch: int | None = None) -> dict[str, float]:
        """Mean seconds per step of each phase (over one epoch, or the whole run), plus bytes per step."""
        steps = [s for s in self.steps if epoch is None or s.epoch == epoch]
        if not steps:
            return {}
        means = {phase: statistics.fmean(getattr(s, phase) for s in steps) for phase in PHASES}
        means["bytes_sent"] = statistics.fmean(s.bytes_sent for s in steps)
        means["bytes_received"] = statistics.fmean(s.bytes_received for s in steps)
        return means

    def header(self, phases: bool = False) -> str:
        text = f"{'epoch':>5}  {'loss':>9}  {'train':>7}  {'val loss':>9}  {'val':>7}  {'seconds':>8}"
        if phases:
            text += "  " + "  ".join(f"{phase + ' ms':>10}" for phase in PHASES) + f"  {'KiB/step':>9}"
        return text

    def row(self, record: EpochRecord, phases: bool = False) -> str:
        """One epoch's line, aligned with header(); phases=True adds its mean per-step phase split."""
        val_loss = "-" if record.val_loss is None else f"{record.val_loss:.5f}"
        text = (f"{record.epoch:>5}  {record.loss:>9.5f}  {_percent(record.train_accuracy):>7}  "
                f"{val_loss:>9}  {_percent(record.val_accuracy):>7}  {record.seconds:>8.3f}")
        if phases:
            means = self.phase_means(record.epoch)
            moved = (means.get("bytes_sent", 0.0) + means.get("bytes_received", 0.0)) / 1024
            split = "  ".join(f"{1000 * means.get(p, 0.0):>10.3f}" for p in PHASES)
            text += f"  {split}  {moved:>9.1f}"
        return text

    def table(self, phases: bool = False) -> str:
        """Every epoch, one line each under a header."""
        return "\n".join([self.header(phases), *(self.row(r, phases) for r in self.epochs)])

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and dicts (JSON-ready)."""
        return {"settings": dict(self.settings), "epochs": [asdict(r) for r in self.epochs],
                "steps": [asdict(s) for s in self.steps]}
