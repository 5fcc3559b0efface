"""A dataset's features: one float32 row per image with its label, class names, file and the run's figures.

What `Coordinator.features` returns and `rmidl features --out` writes; `rmidl train` reads the .npz
(`X`, and `y` or `labels`: in the file both are the class indices, with `classes` their names, written
only for a labelled set). The file holds only arrays numpy loads without pickle: numbers, unicode
strings, and JSON text for the network's settings and the statistics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmidl.errors import InputError
from rmidl.provenance import Provenance

__all__ = ["FORMAT", "FeatureSet"]

FORMAT = "rmidl.features"
VERSION = 1


@dataclass
class FeatureSet:
    """`X` (n, F) float32 in dataset order (images skipped as bad left out), `labels` (n,) int64 class
    indices or None, `classes` (names by index; empty when unlabelled), `paths` (each row's file; None for
    an .npz dataset), `ids` (each row's position in the dataset opened), `bad` (skipped id -> reason),
    `network` (its settings and fingerprint), `stats` (per-stage seconds, images/s, who ran what, the
    images' shape and preprocessing).

    `y` is each row's class *name* (what a classifier predicts), so `rmidl.train(feats.X, feats.y)` and
    `model.score(test.X, test.y)` keep the names; `rmidl.train(feats)` and `model.score(test)` take the
    set whole (with its `provenance`, which a model checks)."""

    X: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]
    paths: tuple[str, ...] | None
    ids: np.ndarray
    network: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def y(self) -> np.ndarray | None:
        """Each row's label as classifiers take it: its class name (the index into `classes` when the
        set has no names, e.g. an .npz dataset without them); None when unlabelled."""
        if self.labels is None or not self.classes:
            return self.labels
        return np.asarray(self.classes)[self.labels]

    @property
    def provenance(self) -> Provenance | None:
        """The network and images these features came from (None when `network`/`stats` do not say)."""
        return Provenance.of_features(self.network, self.stats)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an .npz (X, y and labels, classes, paths, ids, bad, network, stats) through a temporary
        sibling renamed on success, so no reader ever sees half a file; return the path."""
        from rmidl._files import atomic_write, shown

        target = Path(path)
        arrays: dict[str, np.ndarray] = {
            "X": self.X, "ids": self.ids,
            "paths": np.array(self.paths or (), dtype=str),
            "bad": np.array(json.dumps({str(k): v for k, v in self.bad.items()})),
            "network": np.array(json.dumps(self.network)), "stats": np.array(json.dumps(self.stats)),
            "format": np.array(f"{FORMAT} {VERSION}"),
        }
        if self.classes:  # an unlabelled set has none: an empty `classes` array would say "no class names"
            arrays["classes"] = np.array(self.classes, dtype=str)
        if self.labels is not None:
            arrays["y"] = arrays["labels"] = self.labels
        with atomic_write(target, f"features file {shown(target)}") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureSet:
        """A features file save() wrote; anything else is one InputError line naming the file."""
        from rmidl._files import open_regular, shown

        where = f"features file {shown(Path(path))}"
        with open_regular(path, where) as handle:
            try:
                with np.load(handle, allow_pickle=False) as archive:
                    if str(archive.get("format", "")) != f"{FORMAT} {VERSION}":
                        raise InputError(f"{where} is not an rmidl features file (version {VERSION})")
                    labels = archive["labels"] if "labels" in archive.files else None
                    paths = tuple(str(p) for p in archive["paths"])
                    classes = archive["classes"] if "classes" in archive.files else ()
                    return cls(archive["X"], labels, tuple(str(c) for c in classes),
                               paths or None, archive["ids"], json.loads(str(archive["network"])),
                               json.loads(str(archive["stats"])),
                               {int(k): v for k, v in json.loads(str(archive["bad"])).items()})
            except InputError:
                raise
            except (OSError, ValueError, KeyError, EOFError) as error:
                raise InputError(f"{where} cannot be read: {error}") from None

    def __repr__(self) -> str:
        labelled = f", {len(self.classes)} classes" if self.classes else ""
        return f"<FeatureSet {self.X.shape[0]} x {self.X.shape[1]}{labelled}>"
