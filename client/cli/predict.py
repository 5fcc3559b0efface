"""`rmidl predict`: classify a features file with a trained model; if labelled, score it (confusions too)."""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np

from rmidl.client.cli.common import EXIT_OK
from rmidl.client.cli.featurefile import FeatureFile, read_features
from rmidl.errors import OptionError

HELP = "predict the classes of FEATURES.npz with a model `rmidl train` saved; score them if labelled"

MAX_CONFUSION_CLASSES = 30
"""Classes up to which the confusion matrix is printed (beyond, a terminal cannot show it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.npz", help="a model `rmidl train --out` wrote")
    parser.add_argument("features", metavar="FEATURES.npz", help="X (samples, features), labels optional")
    parser.add_argument("--out", metavar="PATH",
                        help="write the predictions: .csv (one row per sample: path or index, label) or .npz "
                             "(predictions, probabilities, paths)")


def run(args: argparse.Namespace) -> int:
    import rmidl

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".npz"):
        raise OptionError(f"--out {args.out!r} must end in .csv or .npz")
    model = rmidl.MLP.load(args.model)
    data = read_features(args.features, labels_required=False)
    model.check_features(data.provenance, data.where)  # same width is not the same features
    probabilities = model.predict_proba(data.x)
    predicted = model.classes[probabilities.argmax(axis=1)]
    lines = []
    if data.labels is not None:
        accuracy = model.score(data.x, data.labels)  # checks that the labels are the model's classes
        lines.append(f"accuracy {100 * accuracy:.2f}% on {len(predicted)} samples of {data.where}")
        lines.extend(confusion_lines(model.classes, data.labels, predicted))
    else:
        counts = Counter(predicted.tolist())
        spread = ", ".join(f"{label}: {counts[label.item()]}" for label in model.classes)
        lines.append(f"{len(predicted)} samples of {data.where} (no labels to score): {spread}")
    if out is not None:
        lines.append(f"predictions written to {write_predictions(out, data, predicted, probabilities)}")
    print("\n".join(lines))
    return EXIT_OK


def confusion_lines(classes: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> list[str]:
    """The confusion matrix (rows: true class, columns: predicted), aligned, with each class's recall."""
    if len(classes) > MAX_CONFUSION_CLASSES:
        return [f"(confusion matrix not shown for {len(classes)} classes)"]
    index = {label.item(): i for i, label in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, ([index[v] for v in labels.tolist()], [index[v] for v in predicted.tolist()]), 1)
    names = [str(label) for label in classes]
    width = max(len(str(matrix.max())), *map(len, names), 4)
    corner = "true \\ predicted"
    first = max(len(corner), *map(len, names))
    rows = ["confusion matrix:",
            f"{corner:<{first}}  " + "  ".join(f"{n:>{width}}" for n in names) + "  recall"]
    for i, (name, row) in enumerate(zip(names, matrix, strict=True)):
        recall = f"{100 * row[i] / row.sum():.1f}%" if row.sum() else "-"
        rows.append(f"{name:<{first}}  " + "  ".join(f"{v:>{width}}" for v in row) + f"  {recall:>6}")
    return rows


def write_predictions(path: Path, data: FeatureFile, predicted: np.ndarray,
                      probabilities: np.ndarray) -> Path:
    """Predictions as .csv (sample, label) or .npz, written through a temporary sibling."""
    from rmidl._files import atomic_write, shown

    samples = data.paths if data.paths is not None else np.arange(len(predicted))
    with atomic_write(path, f"--out {shown(path)}") as handle:
        if path.suffix.lower() == ".npz":
            arrays = {"predictions": predicted, "probabilities": probabilities}
            if data.paths is not None:
                arrays["paths"] = data.paths
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        else:
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow(["path" if data.paths is not None else "sample", "predicted"])
            writer.writerows(zip(samples.tolist(), predicted.tolist(), strict=True))
            handle.write(text.getvalue().encode())
    return path
