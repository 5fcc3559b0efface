"""`rmidl features`: a dataset through a CNN's CNP stages on the cluster (or the local pool), into an .npz."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rmidl.client.cli.common import (
    EXIT_OK,
    HERE,
    add_cluster_arguments,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    note,
)
from rmidl.client.cli.run import parse_workers
from rmidl.errors import OptionError

HELP = "extract CNN features of an image dataset on the cluster and save them (.npz) for rmidl train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmidl.client.features import PLACEMENTS
    from rmidl.client.jobs.features import LOADS
    from rmidl.network import PRESETS

    parser.add_argument("dataset", metavar="DATASET",
                        help="ImageFolder directory (one subfolder per class), a glob, or an .npz of images")
    parser.add_argument("--net", required=True, metavar="SPEC|FILE",
                        help=f"network file (.npz) or spec such as 25x11x11:relu:max2,...; presets: "
                             f"{', '.join(PRESETS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of a spec's banks (default 0)")
    parser.add_argument("--out", required=True, metavar="PATH.npz", help="where the features go")
    add_cluster_arguments(parser, fallback=HERE)
    parser.add_argument("--workers", metavar="NAME[,NAME...]",
                        help="use only these workers of the cluster (default: every registered one)")
    parser.add_argument("--local-threads", type=int, metavar="N",
                        help="threads of this process's pool (default: all cores without a cluster, 0 with)")
    parser.add_argument("--batch", type=int, metavar="B", help="images per task (default: chosen per job)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="tasks",
                        help="tasks: every runner runs whole batches; stages: LOAD, each CNP stage and FLAT "
                             "on a processor of its own (the workers, else threads here), batches flowing "
                             "between them")
    parser.add_argument("--replicas", metavar="R1,R2,...",
                        help="with --placement stages: processors per CNP stage (default 1 each)")
    parser.add_argument("--pipelines", type=int, default=1, metavar="P",
                        help="with --placement stages: P copies of the pipeline sharing the batches")
    parser.add_argument("--load", choices=LOADS, default="auto",
                        help="who decodes the images: auto (workers on this host read the files), "
                             "coordinator, workers (they share the files)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave unreadable or truncated images out (listed in the file), not stop")
    parser.add_argument("--resize", metavar="WxH|S", help="resize images to WxH, or the shorter side to S")
    parser.add_argument("--crop", metavar="WxH", help="centre-crop every image to WxH (after --resize)")
    colour = parser.add_mutually_exclusive_group()
    colour.add_argument("--gray", action="store_const", const=True, dest="gray", help="convert to grayscale")
    colour.add_argument("--color", action="store_const", const=False, dest="gray", help="convert to RGB")
    add_security_arguments(parser)


def parse_size(text: str | None, option: str, *, side: bool) -> int | tuple[int, int] | None:
    """'200x100' -> (100, 200) (rows, cols); with `side`, '200' -> 200 (the shorter side)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match or (match[2] is None and not side) or int(match[1]) < 1 or int(match[2] or 1) < 1:
        form = "WxH or S (the shorter side)" if side else "WxH"
        raise OptionError(f"{option} {text!r} is not {form} with positive integers, e.g. 200x200")
    if match[2] is None:
        return int(match[1])
    return int(match[2]), int(match[1])


def parse_replicas(text: str | None) -> list[int] | None:
    """'2,1,1,1' -> [2, 1, 1, 1] (checked against the network's stages by the coordinator)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise OptionError(f"--replicas {text!r} is not a comma-separated list of counts (2,1,1,1)") from None


def check_out(text: str) -> Path:
    """Refuse a bad --out before any work: a .npz in a directory that exists."""
    path = Path(text)
    if path.suffix.lower() != ".npz":
        raise OptionError(f"--out {text!r} must end in .npz")
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist"
        raise OptionError(f"--out {text!r}: directory {str(path.parent)!r} {why}")
    return path


def run(args: argparse.Namespace) -> int:
    from rmidl.client.coordinator import Coordinator
    from rmidl.client.jobs.features import check_batch, feature_inputs
    from rmidl.client.pipeline.stages import check_replicas
    from rmidl.datasets import open_dataset

    out = check_out(args.out)
    workers = parse_workers(args.workers)
    batch = check_batch(args.batch)
    replicas = parse_replicas(args.replicas)
    if args.placement != "stages" and (replicas is not None or args.pipelines != 1):
        raise OptionError("--replicas and --pipelines shape the stage pipeline: give --placement stages")
    dataset = open_dataset(args.dataset, resize=parse_size(args.resize, "--resize", side=True),
                           crop=parse_size(args.crop, "--crop", side=False), skip_bad=args.skip_bad,
                           gray=args.gray)
    dataset, net = feature_inputs(dataset, args.net, seed=args.seed)
    # every check of the input before a cluster is chosen, contacted or told about
    net.output_shape(dataset.shape)
    if replicas is not None:
        check_replicas(replicas, len(net.stages))
    target = choose_cluster(args, config_from_args(args), fallback=HERE)
    with Coordinator(target.ns, local_threads=args.local_threads, config=target.config,
                     workers=workers) as co:
        if target.note:  # once the options are all accepted: a refused command says one line only
            note(args, target.note)
        features = co.features(dataset, net, batch=batch, progress=not getattr(args, "quiet", False),
                               load=args.load, placement=args.placement, replicas=replicas,
                               pipelines=args.pipelines)
        job = co.last_job()
    features.save(out)
    print(summary(features, job, out))
    if features.bad:
        why = next(iter(features.bad.values()))
        note(args, f"skipped {len(features.bad)} bad image(s) (listed in {out}); first: {why}")
    return EXIT_OK


def summary(features: object, job: dict, out: Path) -> str:
    from rmidl.featureset import FeatureSet

    assert isinstance(features, FeatureSet)
    seconds = float(job.get("seconds", 0.0))
    rate = len(features) / seconds if seconds > 0 else float("inf")
    if job.get("stage_spans"):
        on: dict[str, set[str]] = {}
        for span in job["stage_spans"]:
            on.setdefault(span.stage, set()).add(span.processor)
        where = "stage processors: " + " ".join(f"{stage}={'+'.join(sorted(names))}"
                                                for stage, names in on.items())
    else:
        by = " ".join(f"{name}={n}" for name, n in sorted(job.get("tasks_by", {}).items())) or "-"
        where = f"tasks per runner: {by}"
    names = ", ".join(features.classes[:6]) + (", ..." if len(features.classes) > 6 else "")
    classes = f" ({len(features.classes)} classes: {names})" if features.classes else ""
    return (f"{len(features)} images x {features.X.shape[1]} features{classes} in {seconds:.2f} s, "
            f"{rate:.1f} images/s, {job.get('placement', 'tasks')} placement, {where}; "
            f"wrote {out}")
