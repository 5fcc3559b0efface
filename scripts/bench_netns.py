#!/usr/bin/env python
"""Issue 12: the cluster predictor against real TCP between hosts emulated on this machine (root only).

Run: sudo .venv/bin/python scripts/bench_netns.py [--links 1Gbit,10Gbit] [--workers 1,2] [--repeat 3]

Topology (our own test range 10.77.0.0/24, namespaces and links made here and always removed):

    coordinator (root namespace, 10.77.0.1) --veth-- [switch: namespace rmidl-sw, bridge] --veth-- worker i
                                                                                  (namespace rmidl-wI,
                                                                                   10.77.0.1I)

Every link is shaped with tbf in both directions, so the coordinator's one link carries every gather as
a real cluster's NIC does. The coordinator has no local threads and takes results over TCP (the bulk
channel), and each worker computes with one thread: N workers are N nodes x 1 core of this machine, and
the model predicts them with `predict(..., coordinator_computes=False)`, calibrated on in-process runs at
1 and 2 threads measured in the same run. The links are shaped to the payload rate the model takes for
a line rate (x LINK_EFFICIENCY, TCP over 1500-byte frames): veth hands tbf 64 KiB GSO packets, so it
could not count per-frame overheads itself. A plain TCP stream over each shaped link is measured too.
Delay: added with netem when the kernel has it (netns_hosts.LATENCY_US each way); otherwise the links
keep veth's own ~0.03 ms and the script says so. The hosts themselves are made in netns_hosts.py.

The feature pipeline (a dataset, maps kept on the nodes): `--images N` reference-sized frames (the
bundled picture, shifted) go through one CNP stage of the same bank (relu, 2x2 max pool) with
`Coordinator.features(..., load="coordinator")`, so each frame crosses the link out and its pooled
features come back, and the measured images per second stand beside the model's
`dataset_features_images_per_s` (the pull-queue stream the README's "a second node pays off for a
dataset" rests on). The features are checked bit for bit against the same job in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from netns_hosts import COORDINATOR, LATENCY_US, Topology, WorkerProcess, skip_reason, tcp_goodput

import rmidl
from rmidl.client import Coordinator
from rmidl.client.bench import predict
from rmidl.client.bench.results import Configuration, ConfigurationResult, StudyResult, job_of
from rmidl.client.bench.study import feature_stage_seconds
from rmidl.config import Config
from rmidl.imaging import default_image


def in_process(image: np.ndarray, kernels: np.ndarray, threads: int) -> float:
    start = time.perf_counter()
    rmidl.correlate(image, kernels, threads=threads)
    return time.perf_counter() - start


def calibration(image: np.ndarray, kernels: np.ndarray, runs: dict[int, list[float]],
                stage_seconds: float) -> predict.Calibration:
    """The model fitted to the in-process runs at 1 and 2 threads taken in the same rounds, with the
    features' activation and pooling measured as `rmidl bench` measures it (`stage_seconds`)."""
    results = [ConfigurationResult(Configuration("cores", t, t, f"{t} cores"), times, verified=True)
               for t, times in sorted(runs.items())]
    image3 = image[:, :, None] if image.ndim == 2 else image
    kernels4 = kernels[..., None] if kernels.ndim == 3 else kernels
    study = StudyResult({"usable_cores": os.cpu_count() or 1}, job_of(image3, kernels4, "valid"),
                        {"shared_memory": False}, statistics.median(runs[1]), results,
                        extra={"feature_stage": {"seconds": stage_seconds}})
    return predict.calibrate(study)


class Cluster:
    """The coordinator's view of the emulated workers: one Coordinator per worker count, kept open."""

    def __init__(self, ns_address: str, config: Config, names: list[str], counts: list[int]) -> None:
        self.coordinators = {n: Coordinator(ns_address, local_threads=0, shared_memory=False, config=config,
                                            workers=names[:n]) for n in counts}

    def run(self, count: int, image: np.ndarray, kernels: np.ndarray, expected: np.ndarray) -> float:
        start = time.perf_counter()
        result = self.coordinators[count].correlate(image, kernels)
        seconds = time.perf_counter() - start
        error = float(np.abs(result - expected).max() / np.abs(expected).max())
        if error > 1e-5:
            raise SystemExit(f"result on {count} worker(s) differs from the in-process one by {error:.1e}")
        return seconds

    def features(self, count: int, dataset: Path, net: rmidl.Network, expected: np.ndarray) -> float:
        """Seconds of the features job on `count` workers; it must equal the in-process features."""
        start = time.perf_counter()
        result = self.coordinators[count].features(str(dataset), net, batch=1, load="coordinator",
                                                   progress=False)
        seconds = time.perf_counter() - start
        if not np.array_equal(result.X, expected):
            raise SystemExit(f"features on {count} worker(s) differ from the in-process ones")
        return seconds

    def close(self) -> None:
        for coordinator in self.coordinators.values():
            coordinator.close()


def frames(directory: Path, count: int) -> Path:
    """`count` frames of the reference size (the bundled picture, each shifted) in an .npz dataset."""
    base = default_image(np.uint8)
    path = directory / "frames.npz"
    np.savez(path, images=np.stack([np.roll(base, 97 * i, axis=1) for i in range(count)]))
    return path


def features_network(kernels: np.ndarray) -> rmidl.Network:
    """One CNP stage of the reference bank: correlate, relu, 2x2 max pool (the model's FEATURE_POOL)."""
    stage = rmidl.Stage(kernels, activation="relu", pool="max", pool_size=predict.FEATURE_POOL)
    return rmidl.Network([stage])


def features_in_process(dataset: Path, net: rmidl.Network, threads: int = 2) -> tuple[np.ndarray, float]:
    """The features of the same job run by this process alone on `threads` threads (what every cluster
    run must equal), and its seconds."""
    with Coordinator(local_threads=threads, config=Config(environ={})) as alone:
        start = time.perf_counter()
        features = alone.features(str(dataset), net, batch=1, progress=False).X
        return features, time.perf_counter() - start


def per_image(cal: predict.Calibration, seconds: float) -> predict.Calibration:
    """`cal` with one core's compute per image set to `seconds` (the features job's own, measured in
    process), so the comparison tests the model's transfers rather than its correlation-only compute."""
    return dataclasses.replace(cal, rate_per_core=cal.flops / seconds, serial_fraction=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="1Gbit,10Gbit")
    parser.add_argument("--workers", default="1,2", help="worker counts (each a node x 1 core)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kernels", default="random:128x11x11")
    parser.add_argument("--images", type=int, default=8,
                        help="frames of the feature-pipeline check (0: only the single-image job)")
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        print(f"bench_netns: skipped: {reason}")
        return 0
    links = [predict.parse_link(text) for text in args.links.split(",")]
    counts = sorted({int(n) for n in args.workers.split(",")})
    image, kernels = default_image(), rmidl.load_kernels(args.kernels)
    expected = rmidl.correlate(image, kernels, threads=2)
    stage_seconds = feature_stage_seconds(expected) or 0.0
    print(f"reference job {image.shape[1]}x{image.shape[0]}, {kernels.shape[0]} kernels "
          f"{kernels.shape[1]}x{kernels.shape[2]}: {expected.nbytes / 1e6:.0f} MB of maps; medians of "
          f"{args.repeat} rounds after a warm-up, each round the in-process runs at 1 and 2 threads the "
          "model is fitted to, then every worker count")

    from rmidl.server.nameserver import address_of, start_ns

    rows, feature_rows = [], []
    net = features_network(kernels)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = frames(Path(tmp), args.images) if args.images else None
        expected_features = features_in_process(dataset, net)[0] if dataset else None
        secret_file = Path(tmp, "secret")
        secret_file.write_text(os.urandom(16).hex())
        secret_file.chmod(0o600)
        config = Config(environ={}, secret=secret_file.read_text())
        topology = Topology(max(counts))
        daemon = cluster = None
        workers: list[WorkerProcess] = []
        try:
            _, daemon = start_ns(COORDINATOR, 0, config=config)
            daemon.serve_in_thread()
            ns_address = address_of(daemon)
            workers = [WorkerProcess(i, ns_address, str(secret_file)) for i in range(1, max(counts) + 1)]
            cluster = Cluster(ns_address, config, [w.name for w in workers], counts)
            for label, rate in links:
                topology.shape(rate)
                goodput = tcp_goodput(1)
                runs: dict[int, list[float]] = {1: [], 2: []}
                on_workers: dict[int, list[float]] = {n: [] for n in counts}
                for round_ in range(args.repeat + 1):
                    for threads, times in runs.items():
                        seconds = in_process(image, kernels, threads)
                        times.extend([seconds] if round_ else [])
                    for count, times in on_workers.items():
                        seconds = cluster.run(count, image, kernels, expected)
                        times.extend([seconds] if round_ else [])
                cal = calibration(image, kernels, runs, stage_seconds)
                for count, times in on_workers.items():
                    model = predict.predict(cal, count, 1, (label, rate), coordinator_computes=False)
                    at_tcp = predict.predict(cal, count, 1, (label, goodput), coordinator_computes=False)
                    rows.append((label, rate, goodput, count, statistics.median(times), model, at_tcp, cal))
                if dataset is None or expected_features is None:
                    continue
                on_features: dict[int, list[float]] = {n: [] for n in counts}
                alone: list[float] = []
                for round_ in range(args.repeat + 1):
                    seconds = features_in_process(dataset, net, threads=1)[1]
                    alone.extend([seconds] if round_ else [])
                    for count, times in on_features.items():
                        seconds = cluster.features(count, dataset, net, expected_features)
                        times.extend([seconds] if round_ else [])
                own = per_image(cal, statistics.median(alone) / args.images)
                for count, times in on_features.items():
                    model = predict.predict(cal, count, 1, (label, rate), coordinator_computes=False)
                    at_own = predict.predict(own, count, 1, (label, rate), coordinator_computes=False)
                    feature_rows.append((label, count, args.images / statistics.median(times), model, at_own))
        finally:
            if cluster is not None:
                cluster.close()
            for worker in workers:
                worker.stop()
            if daemon is not None:
                with contextlib.suppress(Exception):
                    daemon.shutdown()
            topology.close()
    delay = f"netem {LATENCY_US} us each way" if topology.netem else "no added delay (kernel without netem)"
    print(f"\nlinks shaped with tbf to the model's payload rate; {delay}\n")
    print("| link | shaped MB/s | plain TCP MB/s | workers | measured s | predicted s | error | bound "
          "| predicted at plain TCP's rate | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    errors, tcp_errors = [], []
    for label, rate, goodput, count, measured, model, at_tcp, _ in rows:
        error = (model.seconds - measured) / measured
        tcp_error = (at_tcp.seconds - measured) / measured
        errors.append(abs(error))
        tcp_errors.append(abs(tcp_error))
        print(f"| {label} | {rate / 1e6:.0f} | {goodput / 1e6:.0f} | {count} | {measured:.3f} | "
              f"{model.seconds:.3f} | {error:+.1%} | {model.bound} | {at_tcp.seconds:.3f} | "
              f"{tcp_error:+.1%} |")
    fits = sorted({(r[0], f"{r[7].rate_per_core / 1e9:.1f} GFLOP/s per core, serial "
                          f"{r[7].serial_fraction:.2f}") for r in rows})
    print("\ncalibration per link (fitted in the same rounds): " + "; ".join(f"{a}: {b}" for a, b in fits))
    print(f"model error over {len(errors)} configurations: at most {max(errors):.1%}, mean "
          f"{statistics.mean(errors):.1%}; at the plain TCP rate measured on the shaped link: at most "
          f"{max(tcp_errors):.1%}, mean {statistics.mean(tcp_errors):.1%}.")
    if feature_rows:
        print_features(feature_rows, args.images, expected_features)
    return 0


FeatureRow = tuple[str, int, float, predict.Prediction, predict.Prediction]


def print_features(rows: list[FeatureRow], images: int, expected: np.ndarray | None) -> None:
    """The feature pipeline's table: measured images per second against the model's, with the compute
    the model takes (the correlation's) and with the features job's own per-image compute."""
    megabytes = expected.nbytes / images / 1e6 if expected is not None else 0.0
    print(f"\nfeature pipeline: {images} frames through one CNP stage (relu, {predict.FEATURE_POOL}x"
          f"{predict.FEATURE_POOL} max pool), load on the coordinator, {megabytes:.0f} MB of features per "
          "frame back over the link; equal bit for bit to the in-process features. Errors are of the time "
          "per image; 'own compute' is the model given the features job's in-process seconds per image "
          "at 1 thread (measured in the same rounds) instead of the correlation's\n")
    print("| link | workers | measured images/s | model images/s | error | bound "
          "| model, own compute | error | bound |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---|")
    errors: list[float] = []
    own_errors: list[float] = []
    for label, count, measured, model, at_own in rows:
        cells = []
        for prediction, kept in ((model, errors), (at_own, own_errors)):
            predicted = prediction.dataset_features_images_per_s
            error = (measured - predicted) / predicted  # (predicted - measured) / measured, in seconds
            kept.append(abs(error))
            cells.append(f"{predicted:.2f} | {error:+.1%} | {prediction.dataset_features_bound}")
        print(f"| {label} | {count} | {measured:.2f} | {cells[0]} | {cells[1]} |")
    print(f"feature-pipeline model error over {len(errors)} configurations: at most {max(errors):.1%}, "
          f"mean {statistics.mean(errors):.1%}; with the job's own compute: at most {max(own_errors):.1%}, "
          f"mean {statistics.mean(own_errors):.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
