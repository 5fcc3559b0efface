#!/usr/bin/env python
"""Benchmark the feature pipeline: rmidl against PyTorch and SGEMM, workers against in-process, the
pipelined speed-up against its prediction; optionally peak memory by dataset size and the textures
preset's held-out accuracy.

Speed, in one run on the same images (a generated texture set, --images of 200x200), rows interleaved
round by round (--repeat rounds, medians): rmidl's Network.forward_batch in-process at 1 and 2 threads
and PyTorch's conv2d -> relu -> max_pool2d (x4, batched, the same banks; skipped with a note when torch
is missing: `pip install torch==2.13.0`, the CPU build) at 1 and 2 threads, on decoded images; the
features job (LOAD included) on the local pool of 2 threads and on 2 local workers; numpy SGEMM at 1 and
2 threads for the machine's peak. Every row's features are checked against rmidl's at 1 thread.
Targets (2 cores, seed004-full, 200x200): >= 2x torch's images/s at 2 threads; 2 local workers >= 0.9x
the in-process job; measured pipelined speed-up >= 0.85x the corrected prediction (the pipeline study's
sequential and stage-mapped runs, --placement stages on threads).

Usage: .venv/bin/python scripts/bench_pipeline.py [--net seed004-full] [--images 32] [--batch 8]
           [--repeat 3] [--quick] [--skip-torch] [--skip-pipeline] [--memory] [--quality]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from rmidl.client import Coordinator
from rmidl.client.bench.machine import wait_for_quiet_threads
from rmidl.client.localcluster import LocalCluster
from rmidl.datasets import Dataset, make_textures, open_dataset
from rmidl.network import Network

SGEMM_N = 2048


def sgemm_gflops(threads: int) -> Callable[[], float]:
    a = np.random.default_rng(0).standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    c = np.empty_like(a)

    def run() -> float:
        with threadpool_limits(limits=threads, user_api="blas"):
            start = time.perf_counter()
            np.matmul(a, a, out=c)
            return 2 * SGEMM_N**3 / (time.perf_counter() - start) / 1e9

    return run


def torch_forward(net: Network, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """PyTorch's conv2d -> activation -> max_pool2d per stage with rmidl's banks, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812 (torch's own name)
    except ImportError:
        return None
    weights = [torch.from_numpy(s.bank.transpose(0, 3, 1, 2).copy()) for s in net.stages]
    activations = {"relu": torch.relu, "tanh": torch.tanh, None: lambda x: x}
    for stage in net.stages:
        if stage.mode != "valid" or stage.activation not in activations or stage.pool not in ("max", None):
            raise SystemExit(f"the torch comparison supports valid relu/tanh max-pooled stages, not {stage}")

    def forward(images: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            x = torch.from_numpy(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))
            for stage, weight in zip(net.stages, weights, strict=True):
                x = F.conv2d(x, weight, groups=x.shape[1] if stage.depthwise else 1)
                x = activations[stage.activation](x)
                if stage.pool == "max":
                    x = F.max_pool2d(x, stage.pool_size, stage.pool_stride or stage.pool_size)
            return x.flatten(1).numpy()

    return forward


def batched(forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([forward(images[a : a + batch]) for a in range(0, len(images), batch)])


class Row:
    """One configuration: a callable returning features, timed each round; its images/s."""

    def __init__(self, label: str, threads: int, run: Callable[[], np.ndarray | None]) -> None:
        self.label, self.threads, self.run = label, threads, run
        self.seconds: list[float] = []
        self.error = 0.0

    def time(self, reference: np.ndarray | None) -> None:
        wait_for_quiet_threads()  # torch's and SGEMM's helpers still spinning would slow this row
        start = time.perf_counter()
        out = self.run()
        self.seconds.append(time.perf_counter() - start)
        if out is not None and reference is not None:
            scale = float(np.abs(reference).max()) or 1.0
            self.error = max(self.error, float(np.abs(out - reference).max()) / scale)

    def rate(self, images: int) -> float:
        return images / statistics.median(self.seconds)


def speed(dataset: Dataset, net: Network, args: argparse.Namespace) -> list[str]:
    images = dataset.read().images
    n = len(images)
    flops = net.describe(dataset.shape).flops
    reference = batched(lambda x: net.forward_batch(x, threads=1), images, args.batch)
    rows = [Row(f"rmidl in-process, {t} thread{'s' * (t > 1)}", t,
                lambda t=t: batched(lambda x: net.forward_batch(x, threads=t), images, args.batch))
            for t in (1, 2)]
    torch_note = None
    if not args.skip_torch:
        for t in (1, 2):
            forward = torch_forward(net, t)
            if forward is None:
                torch_note = "torch is not installed (pip install torch==2.13.0, the CPU build): rows skipped"
                break
            rows.append(Row(f"torch conv2d/relu/max_pool2d, {t} thread{'s' * (t > 1)}", t,
                            lambda f=forward: batched(f, images, args.batch)))

    def job(coordinator: Coordinator) -> np.ndarray:
        return coordinator.features(dataset, net, batch=args.batch, progress=False).X

    pool = Coordinator(None, local_threads=2)
    with LocalCluster(workers=2, threads_per_worker=1, die_with_parent=True) as cluster, pool, \
            Coordinator(cluster, local_threads=0) as workers:
        rows.append(Row("features job, local pool of 2 (LOAD included)", 2, lambda: job(pool)))
        rows.append(Row("features job, 2 local workers (LOAD included)", 2, lambda: job(workers)))
        peaks = {t: sgemm_gflops(t) for t in (1, 2)}
        sgemm: dict[int, list[float]] = {1: [], 2: []}
        for row in rows:  # warm-up: engine plans, pools, worker processes, network blobs
            row.run()
        for _ in range(args.repeat):
            for row in rows:
                row.time(reference)
            for t, run in peaks.items():
                sgemm[t].append(run())
    peak = {t: statistics.median(v) for t, v in sgemm.items()}
    torch_rate = {r.threads: r.rate(n) for r in rows if r.label.startswith("torch")}
    shape = "x".join(map(str, dataset.shape))
    lines = [f"{n} images of {shape}, {net!r}, {flops / 1e6:.0f} MFLOP per image, batches of {args.batch}, "
             f"medians of {args.repeat} interleaved rounds",
             "", "| configuration | images/s | GFLOP/s | % SGEMM (same threads) | vs torch (same threads) | "
             "max rel. diff |", "|:---|---:|---:|---:|---:|---:|"]
    for row in rows:
        rate = row.rate(n)
        versus = f"{rate / torch_rate[row.threads]:.2f}x" if row.threads in torch_rate else ""
        lines.append(f"| {row.label} | {rate:.2f} | {rate * flops / 1e9:.1f} | "
                     f"{100 * rate * flops / 1e9 / peak[row.threads]:.0f}% | {versus} | {row.error:.1e} |")
    for t in (1, 2):
        lines.append(f"| numpy SGEMM {SGEMM_N}^3, {t} thread{'s' * (t > 1)} | | {peak[t]:.1f} | 100% | | |")
    by = {r.label: r.rate(n) for r in rows}
    in_process = by["features job, local pool of 2 (LOAD included)"]
    lines += ["", f"- 2 local workers / in-process job: "
              f"{by['features job, 2 local workers (LOAD included)'] / in_process:.2f}x (target >= 0.9x)"]
    if 2 in torch_rate:
        ratio = by["rmidl in-process, 2 threads"] / torch_rate[2]
        lines.append(f"- rmidl / torch at 2 threads: {ratio:.2f}x (target >= 2x)")
    if torch_note:
        lines.append(f"- {torch_note}")
    return lines


def pipelined(dataset: Dataset, net: Network, args: argparse.Namespace) -> list[str]:
    from rmidl.client.bench.pipeline_study import PipelineSettings, run_pipeline_study

    settings = PipelineSettings(batch=args.batch, runs=args.repeat, warmup=1, workers=(), pipelines=1)
    study = run_pipeline_study(dataset, net, settings)
    (prediction,) = study["predictions"]
    times = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in study["table3"]["per_batch"].items())
    return ["", f"Pipelined (one thread per stage) over sequential, per-batch stage times: {times}",
            f"- Eq. (2) as printed {prediction['eq2']:.2f}x, bottleneck {prediction['bottleneck']:.2f}x, on "
            f"{study['settings']['cores']} cores {prediction['on_cores']:.2f}x; measured "
            f"{prediction['measured']:.2f}x = {prediction['measured_over_predicted']:.2f} of the corrected "
            "prediction (target >= 0.85)"]


PEAK_RSS = """
import sys
from rmidl.client import Coordinator
from rmidl.datasets import open_dataset
with Coordinator(None, local_threads=2) as coordinator:
    coordinator.features(open_dataset(sys.argv[1])[: int(sys.argv[2])], sys.argv[3], batch=16,
                         progress=False, placement=sys.argv[4])
# VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's peak across exec
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


MEMORY_NET = "25x11x11:relu:max2:dw,25x5x5:relu:gavg:dw"
"""seed004's first stage and one more, fitting 64x64 images (6000 of 200x200 would take ~10 minutes
here), with 25 features per image: the (n, F) result, which must grow with n, stays under 1 MB."""


def memory(scratch: Path) -> list[str]:
    """Peak RSS of a child extracting features of 600 and of 6000 images (64x64), each placement."""
    rng = np.random.default_rng(0)
    np.savez(scratch / "many.npz", images=rng.integers(0, 256, (6000, 64, 64), dtype=np.uint8))
    lines = ["", f"Peak RSS (VmHWM of a child), {MEMORY_NET} on 64x64 images, batches of 16:"]
    for placement in ("tasks", "stages"):
        peaks = {}
        for n in (600, 6000):
            argv = [sys.executable, "-c", PEAK_RSS, str(scratch / "many.npz"), str(n), MEMORY_NET, placement]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            peaks[n] = int(done.stdout.split()[-1])
        lines.append(f"- {placement} placement: 600 images {peaks[600] / 1024:.0f} MiB, 6000 images "
                     f"{peaks[6000] / 1024:.0f} MiB ({peaks[6000] / peaks[600]:.3f}x; target <= 1.10x)")
    return lines


def quality(scratch: Path) -> list[str]:
    """The textures preset on make_textures' set (100 per class, 200x200): rmidl.train's held-out accuracy."""
    import rmidl

    made = make_textures(scratch / "quality", per_class=100, size=200, seed=0)
    lines = ["", "Quality: preset 'textures' on make_textures(per_class=100, size=200) (train/test from "
             "disjoint regions), rmidl.train (hidden 25, 60 epochs)"]
    with Coordinator(None) as coordinator:
        for seed in (0, 1, 2):
            net = Network.from_spec("textures", seed=seed)
            train = coordinator.features(made.train, net, progress=False)
            test = coordinator.features(made.test, net, progress=False)
            model, _ = rmidl.train(train.X, train.y, hidden=(25,), epochs=60, seed=0)
            accuracy = float(np.mean(model.predict(test.X) == test.y))
            lines.append(f"- net seed {seed}: {accuracy:.1%} of {len(test)} held-out images (target >= 90%)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="seed004-full")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 images, 1 round, batches of 4")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak RSS for 600 and 6000 images")
    parser.add_argument("--quality", action="store_true", help="held-out accuracy of the textures preset")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeat, args.batch = 8, 1, 4
    with tempfile.TemporaryDirectory(prefix="rmidl-bench-pipeline-") as scratch:
        root = Path(scratch)
        per_class = -(-args.images // 6) * 5 // 4 + 1  # the train split keeps 80%
        made = make_textures(root / "data", per_class=per_class, size=args.size, seed=0)
        dataset = open_dataset(made.train)[: args.images]
        net = Network.from_spec(args.net)
        sections: list[Callable[[], list[str]]] = [lambda: speed(dataset, net, args)]
        if not args.skip_pipeline:
            sections.append(lambda: pipelined(dataset, net, args))
        if args.memory:
            sections.append(lambda: memory(root))
        if args.quality:
            sections.append(lambda: quality(root))
        for section in sections:  # each printed as it is done
            print("\n".join(section()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
