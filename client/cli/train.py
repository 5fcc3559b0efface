"""`rmidl train`: train the classifier on a features file, here or on a cluster; save the model and a plot."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmidl.client.cli.common import (
    EXIT_OK,
    HERE,
    add_cluster_arguments,
    add_coordinator_arguments,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    note,
)
from rmidl.client.cli.featurefile import read_features
from rmidl.errors import OptionError
from rmidl.history import PHASES, EpochRecord, History

HELP = "train the classifier (an MLP) on FEATURES.npz, on the cluster or here; save the model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = textwrap.fill(
        "Prints a line per epoch (with a progress bar on a terminal); -v adds each epoch's phase split "
        "(send, compute, gather, reduce, update: ms per step) and bytes moved at the end, -q leaves the "
        "result line only. The same settings give the same model here or on any cluster, bit for bit.", 100)
    parser.add_argument("features", metavar="FEATURES.npz",
                        help="X (samples, features) and y or labels: what `rmidl features` writes")
    parser.add_argument("--hidden", default="25", metavar="N[,N...]",
                        help="hidden layer sizes ('none': no hidden layer)")
    parser.add_argument("--activation", default="sigmoid", help="hidden activation: sigmoid, relu or tanh")
    parser.add_argument("--output", default="softmax",
                        help="softmax (cross-entropy) or sigmoid (squared error, the paper's)")
    parser.add_argument("--epochs", type=int, default=30, metavar="N", help="passes over the data")
    parser.add_argument("--batch", default="64", metavar="N|full",
                        help="samples per step ('full': batch gradient descent)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="L2 decay of the weights (not the biases)")
    parser.add_argument("--validation", type=float, default=0.2, metavar="FRACTION",
                        help="share of each class held out and scored after every epoch")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initial weights, the split and the shuffles")
    parser.add_argument("--shards", type=int, metavar="N",
                        help="logical shards per step (default min(16, batch / 32)): never the worker count")
    add_cluster_arguments(parser, fallback=HERE)
    add_coordinator_arguments(parser, moved="gradients")
    add_security_arguments(parser)
    parser.add_argument("--out", metavar="MODEL.npz", help="save the trained model here")
    parser.add_argument("--plot", metavar="PATH.png",
                        help="loss/accuracy plot (default: beside --out, as .png; needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true", help="draw no plot")


def parse_hidden(text: str) -> tuple[int, ...]:
    """--hidden '64,32' -> (64, 32); 'none' -> (); a size below 1 is named in the CLI's terms."""
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise OptionError(f"--hidden {text!r} is not a comma-separated list of sizes (or 'none')") from None
    if min(sizes) < 1:
        raise OptionError(f"--hidden {text!r}: every hidden layer needs a whole number of units >= 1 "
                          "(--hidden none trains without a hidden layer)")
    return sizes


def parse_batch(text: str) -> int | None:
    if text.strip().lower() == "full":
        return None
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"--batch {text!r} is not a number of samples or 'full'") from None


def plot_target(args: argparse.Namespace) -> Path | None:
    """Where the plot goes: --plot, else beside --out; None without either, or with --no-plot."""
    if args.no_plot:
        return None
    if args.plot is not None:
        target = Path(args.plot)
        if target.suffix.lower() != ".png":
            raise OptionError(f"--plot {args.plot!r} must end in .png")
        return target
    return Path(args.out).with_suffix(".png") if args.out else None


def run(args: argparse.Namespace) -> int:
    import rmidl
    from rmidl.client.cli.run import parse_workers
    from rmidl.client.coordinator import Coordinator

    hidden, batch = parse_hidden(args.hidden), parse_batch(args.batch)
    if args.out is not None and Path(args.out).suffix.lower() != ".npz":
        raise OptionError(f"--out {args.out!r} must end in .npz")
    plot = plot_target(args)
    for option, target in (("--out", args.out), ("--plot", plot)):
        folder = Path(target).parent if target is not None else None
        if folder is not None and not folder.is_dir():  # found now, not after the training
            why = "is not a directory" if folder.exists() else "does not exist"
            raise OptionError(f"{option} {str(target)!r}: directory {str(folder)!r} {why}")
    workers = parse_workers(args.workers)
    data = read_features(args.features, labels_required=True)
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    settings: dict[str, Any] = {
        "hidden": hidden, "activation": args.activation, "output": args.output, "epochs": args.epochs,
        "batch": batch, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "validation": args.validation, "seed": args.seed, "shards": args.shards,
        "classes": None if data.classes is None else list(data.classes), "provenance": data.provenance,
    }
    target = choose_cluster(args, config_from_args(args), fallback=HERE)
    # said after the first epoch, once rmidl.train accepted every option: a refused command says one line
    settings["callback"] = _EpochLines(quiet=quiet, first=lambda: target.note and note(args, target.note))
    started = time.perf_counter()
    if target.ns is None:
        model, history = rmidl.train(data.x, data.labels, threads=args.local_threads, **settings)
        where = "here"
    else:
        with Coordinator(target.ns, local_threads=args.local_threads, config=target.config,
                         shared_memory=not args.no_shared_memory, workers=workers) as co:
            model, history = rmidl.train(data.x, data.labels, coordinator=co, **settings)
            tasks = co.last_job().get("tasks_by", {})
        where = "tasks: " + (" ".join(f"{name}={n}" for name, n in sorted(tasks.items())) or "-")
    seconds = time.perf_counter() - started
    if verbose:  # rmidl.train's callback sees each epoch, not its steps: the phase split comes at the end
        print("\n".join(phase_lines(history)))
    saved = [f"model saved to {model.save(args.out)}"] if args.out else ["not saved (no --out)"]
    if plot is not None:
        saved.append(_plot(history, plot))
    print(f"{_result(model, history)} in {seconds:.1f} s ({where}); {'; '.join(saved)}")
    return EXIT_OK


class _EpochLines:
    """The per-epoch lines under a header, written so that a progress bar on stderr stays whole."""

    def __init__(self, *, quiet: bool, first: Callable[[], object]) -> None:
        self.quiet, self.first = quiet, first
        self.history = History()

    def __call__(self, record: EpochRecord, model: object) -> None:
        if not self.history.epochs:
            self.first()
        if self.quiet:
            self.history.epochs.append(record)
            return
        from tqdm import tqdm

        if not self.history.epochs:
            tqdm.write(self.history.header(), file=sys.stdout)
        self.history.epochs.append(record)
        tqdm.write(self.history.row(record), file=sys.stdout)


def _result(model: Any, history: History) -> str:
    last = history.epochs[-1]
    scores = f"train accuracy {100 * last.train_accuracy:.1f}%"
    if last.val_accuracy is not None:
        scores = f"validation accuracy {100 * last.val_accuracy:.1f}%, " + scores
    return f"{model!r} after {last.epoch} epochs: {scores}"


def phase_lines(history: History) -> list[str]:
    """Each epoch's mean step split by phase (ms) and bytes moved, then the run's mean with shares."""
    lines = [f"{'epoch':>5}  " + "  ".join(f"{p + ' ms':>10}" for p in PHASES) + f"  {'KiB/step':>9}"]
    for epoch in history.series("epoch"):
        means = history.phase_means(epoch)
        moved = (means["bytes_sent"] + means["bytes_received"]) / 1024
        lines.append(f"{epoch:>5}  " + "  ".join(f"{1000 * means[p]:>10.3f}" for p in PHASES)
                     + f"  {moved:>9.1f}")
    means = history.phase_means()
    total = sum(means[p] for p in PHASES) or 1.0
    split = ", ".join(f"{p} {1000 * means[p]:.2f} ms ({100 * means[p] / total:.0f}%)" for p in PHASES)
    moved = (means["bytes_sent"] + means["bytes_received"]) / 2**20
    lines.append(f"per step: {split}; {moved:.2f} MiB moved")
    return lines


def _plot(history: History, path: Path) -> str:
    """Loss and accuracy per epoch (training and validation) as a PNG; or why there is none."""
    from rmidl.client.bench.output import save_figure
    from rmidl.client.bench.plots import unavailable

    why = unavailable()
    if why is not None:
        print(f"rmidl: no plot: {why}", file=sys.stderr)
        return "no plot (matplotlib missing)"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9.6, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss, accuracy = figure.subplots(1, 2)
    epochs = history.series("epoch")
    for axes, (train, held), label in ((loss, ("loss", "val_loss"), "loss"),
                                       (accuracy, ("train_accuracy", "val_accuracy"), "accuracy")):
        axes.plot(epochs, history.series(train), marker="o", label="training")
        values = history.series(held)
        if any(v is not None for v in values):
            axes.plot(epochs, values, marker="o", label="validation")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"rmidl train: {history.settings.get('sizes')}, {history.settings.get('activation')}")
    save_figure(figure, path)
    return f"plot {path}"
