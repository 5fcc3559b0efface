"""`rmidl bench`: every file written, tables that agree with results.json, sound plots, and the cost model."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmidl.client import cli
from rmidl.client.bench import derived, forecast, machine, predict, report, study, tables
from rmidl.client.bench.results import Configuration, ConfigurationResult, Job, StudyResult, StudySettings

TINY = ["--size", "96x64", "--kernels", "random:4x5x5", "--runs", "2"]
CORE_FILES = {
    "table3.md", "table3.csv", "table4.md", "table4.csv", "efficiency.md", "efficiency.csv", "results.json",
    "fig10_time_vs_cores.png", "fig11_speedup.png", "time_vs_workers.png",
}  # fmt: skip
PREDICTION_FILES = {"prediction.md", "prediction.csv", "prediction_speedup.png", "prediction_dataset.png"}


def _bench(out: Path, *extra: str) -> int:
    return cli.main(["bench", *TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def cores_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One tiny study (cores 1, 2; workers 0, 1 via a local cluster) with predictions, read by many tests."""
    out = tmp_path_factory.mktemp("bench")
    code = _bench(out, "--cores", "1,2", "--workers", "0,1", "--predict", "1,2,4", "--link", "1Gbit,10Gbit")
    return code, out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _label(config: dict) -> str:
    return config["config"]["label"] + ("*" if config["config"]["oversubscribed"] else "")


def test_bench_writes_every_file(cores_run: tuple[int, Path]) -> None:
    code, out = cores_run
    assert code == 0
    assert {p.name for p in out.iterdir()} >= CORE_FILES | PREDICTION_FILES
    data = _results(out)
    machine = data["machine"]
    assert machine["cpu_model"] and machine["usable_cores"] >= 1 and machine["versions"]["numpy"]
    assert {"library", "architecture", "version"} <= set(machine["blas"][0])
    assert data["job"]["image_source"] == "built-in image at 96x64"
    assert data["job"]["image_shape"] == [64, 96, 1] and data["job"]["kernels_shape"] == [4, 5, 5, 1]
    assert [c["config"]["label"] for c in data["configurations"]] == [
        "1 core",
        "2 cores",
        "0 workers",
        "1 worker",
    ]
    assert all(c["verified"] and len(c["times"]) == 2 for c in data["configurations"])
    assert all(c["max_abs_error"] <= c["tolerance"] for c in data["configurations"])
    # CPU seconds of this process per run: measured, so never 0 (a run costs at least microseconds)
    assert all(len(c["cpu_times"]) == 2 and min(c["cpu_times"]) > 0 for c in data["configurations"])
    assert [c["details"]["workers"] for c in data["configurations"][2:]] == [0, 1]
    assert data["paper"]["average_seconds"] == [85.9125, 49.0664, 25.3766, 14.2801]


def test_table3_agrees_with_results_json(cores_run: tuple[int, Path]) -> None:
    _, out = cores_run
    configs = _results(out)["configurations"]
    rows = {row["run"]: row for row in _csv(out / "table3.csv")}
    for config in configs:
        column = _label(config)
        assert [float(rows[str(i + 1)][column]) for i in range(2)] == config["times"]
        assert float(rows["total"][column]) == pytest.approx(sum(config["times"]), rel=1e-12)
        assert float(rows["average"][column]) == pytest.approx(sum(config["times"]) / 2, rel=1e-12)
    assert float(rows["average"]["paper: 8 cores"]) == 14.2801
    assert rows["1"]["paper: 8 cores"] == ""  # the paper's single runs are not invented
    # the markdown table shows the same numbers (to its six significant digits)
    md = (out / "table3.md").read_text().splitlines()
    header = [cell.strip() for cell in md[2].strip("|").split("|")]
    average = next(line for line in md if line.startswith("| **average**"))
    cells = dict(zip(header, (c.strip() for c in average.strip("|").split("|")), strict=True))
    for config in configs:
        assert float(cells[_label(config)]) == pytest.approx(sum(config["times"]) / 2, rel=1e-5)


def test_speedups_are_recomputed_from_the_times(cores_run: tuple[int, Path]) -> None:
    _, out = cores_run
    configs = _results(out)["configurations"]
    averages = {_label(c): sum(c["times"]) / len(c["times"]) for c in configs}
    matrix = {row["speed-up of row over column"]: row for row in _csv(out / "table4.csv")}
    for row_label, row_avg in averages.items():
        for column_label, column_avg in averages.items():
            assert float(matrix[row_label][column_label]) == pytest.approx(column_avg / row_avg, rel=1e-12)
    assert float(matrix["paper: 8 cores"]["paper: 1 core"]) == pytest.approx(6.016, abs=5e-4)
    efficiency = {row["configuration"]: row for row in _csv(out / "efficiency.csv")}
    for config in configs:
        speedup = averages["1 core"] / averages[_label(config)]
        row = efficiency[config["config"]["label"]]
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-12)
        assert float(row["efficiency"]) == pytest.approx(speedup / config["config"]["threads"], rel=1e-12)


@pytest.mark.parametrize("name", sorted(n for n in CORE_FILES | PREDICTION_FILES if n.endswith(".png")))
def test_plots_are_valid_pngs_of_sensible_size(cores_run: tuple[int, Path], name: str) -> None:
    _, out = cores_run
    path = out / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert 400 <= image.width <= 2000 and 300 <= image.height <= 2000
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # something was drawn, not a blank canvas


def test_without_matplotlib_the_tables_are_written_and_one_line_says_how_to_get_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is the optional `plot` extra: its absence costs the plots, never the study."""
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    code = _bench(tmp_path, "--cores", "1", "--runs", "1", "--predict", "1,2")
    captured = capsys.readouterr()
    assert code == 0
    tables = {n for n in CORE_FILES | PREDICTION_FILES if not n.endswith(".png")}
    assert {p.name for p in tmp_path.iterdir()} == tables
    assert f"wrote {len(tables)} files" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmidl: plots skipped: matplotlib is not installed"), err
    assert "pip install 'rmidl[plot]'" in err[0]


def test_prediction_is_in_results_json_and_its_table(cores_run: tuple[int, Path]) -> None:
    _, out = cores_run
    prediction = _results(out)["prediction"]
    points = prediction["points"]
    assert [(p["link"], p["nodes"]) for p in points] == [
        (link, n) for link in ("1Gbit", "10Gbit") for n in (1, 2, 4)
    ]
    assert {row["link"] for row in _csv(out / "prediction.csv")} == {"1Gbit", "10Gbit"}
    # the stated error is the largest |model - median run| / median run over the measured configurations
    calibration = prediction["calibration"]
    fit = {f["configuration"]: f for f in calibration["fit"]}
    configs = _results(out)["configurations"]
    assert sorted(fit) == sorted(c["config"]["label"] for c in configs)
    for config in configs:
        f = fit[config["config"]["label"]]
        assert f["measured_seconds"] == pytest.approx(float(np.median(config["times"])), rel=1e-12)
        error = (f["predicted_seconds"] - f["measured_seconds"]) / f["measured_seconds"]
        assert f["relative_error"] == pytest.approx(error, rel=1e-9, abs=1e-15)
    errors = [abs(f["relative_error"]) for f in fit.values()]
    assert calibration["stated_error"] == pytest.approx(max(errors), rel=1e-12)
    text = (out / "prediction.md").read_text()
    assert f"Model error on the measured configurations: at most {max(errors):.1%}" in text
    # the study measured the features' activation and pooling, and the model counts it
    stage = _results(out)["feature_stage"]["seconds"]
    assert stage > 0 and calibration["stage_seconds"] == stage
    assert "s per image on 1 core to activate and pool the maps" in text


def test_oversubscribed_core_counts_are_marked_not_dropped() -> None:
    configs = study.configurations(StudySettings(cores=(1, 2, 4), workers=(0, 2)), available=2)
    assert [(c.label, c.oversubscribed) for c in configs] == [
        ("1 core", False),
        ("2 cores", False),
        ("4 cores", True),
        ("0 workers", False),
        ("2 workers", False),
    ]


def test_a_wrong_result_never_counts(rng: np.random.Generator, tmp_path: Path) -> None:
    image = rng.random((20, 24), dtype=np.float32)
    kernels = rng.standard_normal((3, 3, 3)).astype(np.float32)
    import rmidl

    @contextlib.contextmanager
    def runner(config: Configuration, settings: StudySettings) -> Iterator:
        def correlate(img: np.ndarray, ker: np.ndarray, mode: str) -> np.ndarray:
            out = rmidl.correlate(img, ker, mode=mode, threads=config.threads)
            if config.count == 2:
                out[1, 3, 4] += 1.0  # one wrong value among many
            return out

        yield correlate

    result = study.run_study(image, kernels, StudySettings(cores=(1, 2), runs=2), runner=runner)
    good, bad = result.results
    assert good.counted and len(good.times) == 2 and good.max_abs_error == 0
    assert not bad.counted and "differs from the single-thread result" in (bad.failure or "")
    assert bad.max_abs_error == pytest.approx(1.0, rel=1e-5) and bad.times == []
    report.write_report(result, tmp_path)
    assert "2 cores" not in _csv(tmp_path / "table3.csv")[0]
    assert "Not counted: 2 cores" in (tmp_path / "table3.md").read_text()


def test_a_failing_configuration_is_recorded_and_the_study_goes_on(rng: np.random.Generator) -> None:
    image = rng.random((20, 24), dtype=np.float32)
    kernels = rng.standard_normal((2, 3, 3)).astype(np.float32)
    import rmidl
    from rmidl.errors import WorkerLost

    @contextlib.contextmanager
    def runner(config: Configuration, settings: StudySettings) -> Iterator:
        if config.count == 1:
            raise WorkerLost("worker w1 stopped answering")
        yield lambda img, ker, mode: rmidl.correlate(img, ker, mode=mode, threads=config.threads)

    result = study.run_study(image, kernels, StudySettings(cores=(1, 2), runs=1), runner=runner)
    assert [r.counted for r in result.results] == [False, True]
    assert result.results[0].failure == "WorkerLost: worker w1 stopped answering"
    assert derived.baseline(result) == ("reference run (1 thread)", result.reference_seconds)


@pytest.mark.parametrize(("shape", "measured"), [((20, 24), True), ((3, 24), False)])
def test_the_study_measures_the_feature_stage_where_its_window_fits(rng: np.random.Generator, shape,
                                                                     measured: bool) -> None:
    image = rng.random(shape, dtype=np.float32)  # 3 rows and 3x3 kernels: maps of one row, no 2x2 pool
    kernels = rng.standard_normal((2, 3, 3)).astype(np.float32)
    result = study.run_study(image, kernels, StudySettings(cores=(1,), runs=1))
    assert [r.counted for r in result.results] == [True]
    stage = StudyResult.from_dict(json.loads(json.dumps(result.to_dict()))).extra["feature_stage"]
    assert (stage["seconds"] > 0) if measured else stage is None
    assert (predict.calibrate(result).stage_seconds > 0) is measured


@pytest.mark.parametrize(("warmup", "seconds"), [(1, 1.0), (0, 10.0)])
def test_the_reference_is_timed_warm_like_every_configuration(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, warmup: int, seconds: float
) -> None:
    """It is the baseline without a 1-core configuration: a cold first call must not be its time."""
    import rmidl

    real = rmidl.correlate
    now = [0.0]

    def correlate(*args: object, **kwargs: object) -> np.ndarray:
        now[0] += 10.0 if now[0] == 0.0 else 1.0  # the first call in a process is the slow one
        return real(*args, **kwargs)

    @contextlib.contextmanager
    def runner(config: Configuration, settings: StudySettings) -> Iterator:
        yield lambda img, ker, mode: real(img, ker, mode=mode, threads=config.threads)

    monkeypatch.setattr(rmidl, "correlate", correlate)
    image = rng.random((20, 24), dtype=np.float32)
    kernels = rng.standard_normal((2, 3, 3)).astype(np.float32)
    settings = StudySettings(cores=(2,), runs=1, warmup=warmup)
    result = study.run_study(image, kernels, settings, runner=runner, clock=lambda: now[0])
    assert result.reference_seconds == seconds
    assert derived.baseline(result) == ("reference run (1 thread)", seconds)


@pytest.mark.parametrize(("wall", "cpu", "busy"), [(1.0, 1.0, False), (1.1, 1.0, False), (2.0, 0.8, True)])
def test_a_busy_machine_is_called_out(wall: float, cpu: float, busy: bool) -> None:
    config = Configuration("cores", 1, 1, "1 core")
    one = ConfigurationResult(config, [wall] * 3, cpu_times=[cpu] * 3, verified=True)
    result = StudyResult({}, Job((8, 8, 1), (1, 3, 3, 1), "valid", "float32"), {}, wall, [one])
    assert derived.busy_factor(result) == pytest.approx(wall / cpu)
    assert ("was busy" in " ".join(tables.summary_notes(result))) is busy


# -- the cost model --------------------------------------------------------------------------------------
PAPER_JOB = Job((720, 1280, 1), (128, 11, 11, 1), "valid", "float32")


def _synthetic(
    job: Job, t1: float, serial: float, cores: tuple[int, ...], *, usable: int, noise: float = 0.0,
    bandwidth: float | None = None, workers: tuple[int, ...] = (),
) -> StudyResult:  # fmt: skip
    """A study whose times follow the model exactly (times noise), as if measured."""
    rng = np.random.default_rng(7)

    def times(seconds: float) -> list[float]:
        return list(seconds * (1 + noise * rng.uniform(-1, 1, 5)))

    def amdahl(p: int) -> float:
        return t1 * (serial + (1 - serial) / min(p, usable))

    results = [
        ConfigurationResult(Configuration("cores", c, c, f"{c} cores"), times(amdahl(c)), verified=True)
        for c in cores
    ]
    for w in workers:
        moved = job.input_bytes + w * job.bank_bytes + job.output_bytes
        seconds = amdahl(w) + moved / bandwidth
        results.append(
            ConfigurationResult(Configuration("workers", w, w, f"{w} w"), times(seconds), verified=True)
        )
    return StudyResult({"usable_cores": usable}, job, {"shared_memory": False}, t1, results)


def test_a_model_no_run_could_check_does_not_claim_zero_error(tmp_path: Path) -> None:
    config = Configuration("cluster", 0, 0, "cluster at 127.0.0.1:1")
    failed = ConfigurationResult(config, failure="RegistryError: name server is not reachable")
    result = StudyResult({"usable_cores": 2}, Job((64, 64, 1), (2, 3, 3, 1), "valid", "float32"), {}, 0.01,
                         [failed])
    cal = predict.calibrate(result)
    report.write_prediction(cal, [predict.predict(cal, 2, 2, predict.parse_link("1Gbit"))], tmp_path)
    text = (tmp_path / "prediction.md").read_text()
    assert "Model error on the measured configurations: not checked" in text and "0.0%" not in text
    assert forecast.model_error(cal).startswith("not checked")  # the terminal says the same


def test_calibration_recovers_a_synthetic_machine_exactly() -> None:
    synthetic = _synthetic(PAPER_JOB, 40.0, 0.07, (1, 2, 4), usable=16, bandwidth=2e9, workers=(1, 2))
    cal = predict.calibrate(synthetic)
    assert cal.rate_per_core == pytest.approx(PAPER_JOB.flops / 40.0, rel=1e-9)
    assert cal.serial_fraction == pytest.approx(0.07, abs=1e-9)
    assert cal.dataplane_bandwidth == pytest.approx(2e9, rel=1e-9)
    assert cal.stated_error < 1e-9
    # held out: 16 cores was never measured, yet follows from what was
    assert cal.compute_seconds(16) == pytest.approx(40.0 * (0.07 + 0.93 / 16), rel=1e-9)


def test_predictor_reproduces_noisy_measurements_within_its_stated_error() -> None:
    synthetic = _synthetic(PAPER_JOB, 40.0, 0.07, (1, 2, 4, 8), usable=8, noise=0.02)
    cal = predict.calibrate(synthetic)
    assert 0 < cal.stated_error < 0.05
    assert cal.serial_fraction == pytest.approx(0.07, abs=0.02)
    for result in synthetic.results:
        modelled = predict.modelled_seconds(cal, "cores", result.config.count, result.config.threads)
        median = float(np.median(result.times))  # the model fits each configuration's median run
        assert abs(modelled - median) <= cal.stated_error * median * (1 + 1e-9)


def test_gathering_the_output_bounds_the_paper_job_on_slow_links() -> None:
    cal = predict.calibrate(_synthetic(PAPER_JOB, 0.6, 0.02, (1, 2), usable=2))
    one_gbit = predict.parse_link("1Gbit")
    alone = predict.predict(cal, 1, 8, one_gbit)
    assert alone.bound == "compute" and alone.gather_seconds == 0
    eight = predict.predict(cal, 8, 8, one_gbit)
    assert eight.gather_bound
    assert eight.gather_seconds == pytest.approx(PAPER_JOB.output_bytes * 7 / 8 / (1e9 / 8 * 0.94), rel=1e-12)
    assert eight.speedup < alone.speedup  # 462 MB over 1 Gbit costs more than the cores save
    fast = predict.predict(cal, 8, 8, predict.parse_link("10TB/s"))
    assert fast.bound == "compute" and fast.speedup > alone.speedup
    assert all(p.speedup <= p.ideal_speedup for p in (alone, eight, fast))


def test_keeping_the_maps_on_the_nodes_gathers_only_pooled_features() -> None:
    cal = predict.calibrate(_synthetic(PAPER_JOB, 0.6, 0.02, (1, 2), usable=2))
    one_gbit = predict.parse_link("1Gbit")
    rate = 1e9 / 8 * 0.94
    eight = predict.predict(cal, 8, 8, one_gbit, pool=2)
    # a quarter of the maps' bytes come back: still gather-bound at 1 Gbit, four times sooner
    assert eight.features_bound == "gather"
    gather = PAPER_JOB.output_bytes / 4 * 7 / 8 / rate
    assert gather < eight.features_seconds < gather * 1.2
    assert eight.features_seconds < eight.seconds and eight.features_speedup > eight.speedup
    # with enough pooling the image's way out (scatter) decides, not the maps' way back
    coarse = predict.predict(cal, 8, 8, one_gbit, pool=64)
    assert coarse.features_bound == "scatter"


def test_a_dataset_streams_images_over_every_node() -> None:
    cal = predict.calibrate(_synthetic(PAPER_JOB, 0.6, 0.0, (1, 2), usable=2))
    alone = predict.predict(cal, 1, 2, predict.parse_link("1Gbit"))
    assert alone.dataset_images_per_s == pytest.approx(1 / cal.compute_seconds(2), rel=1e-12)
    fast = predict.predict(cal, 4, 2, predict.parse_link("10TB/s"))
    assert fast.dataset_images_per_s == pytest.approx(4 / cal.compute_seconds(2), rel=1e-9)
    slow = predict.predict(cal, 4, 2, predict.parse_link("1Gbit"))
    rate = 1e9 / 8 * 0.94
    # the coordinator's node computes at its pace; what the others add is what the link carries back
    assert slow.dataset_bound == "gather"
    own = 1 / cal.compute_seconds(2)
    assert slow.dataset_images_per_s == pytest.approx(own + rate / PAPER_JOB.output_bytes, rel=1e-12)
    assert slow.dataset_features_images_per_s == pytest.approx(own + 4 * rate / PAPER_JOB.output_bytes,
                                                               rel=1e-12)
    assert slow.dataset_images_per_s > alone.dataset_images_per_s  # a queue never loses by a node


def test_a_coordinator_without_local_threads_sends_everything_over_its_link() -> None:
    cal = predict.calibrate(_synthetic(PAPER_JOB, 0.6, 0.0, (1, 2), usable=2))
    link = predict.parse_link("1Gbit")
    alone = predict.predict(cal, 1, 1, link, coordinator_computes=False)
    assert alone.gather_seconds == pytest.approx(PAPER_JOB.output_bytes / (1e9 / 8 * 0.94), rel=1e-12)
    assert alone.bound == "gather" and alone.seconds > alone.gather_seconds


def test_features_predictions_add_the_measured_activation_and_pooling() -> None:
    study = _synthetic(PAPER_JOB, 0.6, 0.0, (1, 2), usable=2)
    plain = predict.calibrate(study)
    study.extra["feature_stage"] = {"seconds": 0.15}
    staged = predict.calibrate(study)
    assert plain.stage_seconds == 0.0 and staged.stage_seconds == 0.15
    link = predict.parse_link("100GB/s")  # compute-bound: the stage's cost shows in full
    one = predict.predict(staged, 1, 1, link)
    assert 1 / one.dataset_features_images_per_s == pytest.approx(staged.compute_seconds(1) + 0.15, rel=1e-12)
    for nodes, cores in ((1, 1), (3, 2)):
        before, after = (predict.predict(cal, nodes, cores, link) for cal in (plain, staged))
        assert after.dataset_features_images_per_s < before.dataset_features_images_per_s
        assert after.features_seconds > before.features_seconds
        # the maps-gathered figures do not activate or pool
        assert after.dataset_images_per_s == before.dataset_images_per_s and after.seconds == before.seconds
    assert forecast.prediction_block(staged, [])["calibration"]["stage_seconds"] == 0.15


def test_payoff_says_when_a_second_node_beats_one() -> None:
    cal = predict.calibrate(_synthetic(PAPER_JOB, 0.6, 0.02, (1, 2), usable=2))
    points = predict.predict_many(cal, (1, 2, 4, 8), 8, [predict.parse_link("1Gbit"),
                                                        predict.parse_link("10TB/s")])
    lines = forecast.payoff(points)
    assert len(lines) == 2
    assert "one image, maps gathered: never up to 8 nodes" in lines[0]  # 462 MB over 1 Gbit
    assert "one image, maps gathered: from 2 nodes" in lines[1]
    assert "a dataset, maps gathered: from 2 nodes" in lines[0]  # the link adds a little to one node


def test_the_paper_job_is_compared_with_the_paper() -> None:
    paper_job = _synthetic(PAPER_JOB, 0.5, 0.0, (1,), usable=2)
    notes = " ".join(tables.summary_notes(paper_job))
    assert "took 0.5 s against the paper's 85.9125 s, 172x faster" in notes
    other = _synthetic(Job((64, 96, 1), (4, 5, 5, 1), "valid", "float32"), 0.5, 0.0, (1,), usable=2)
    assert tables.versus_paper(other) is None


def test_kernel_groups_win_for_a_big_bank_on_a_small_image() -> None:
    deep = Job((16, 16, 256), (512, 3, 3, 256), "valid", "float32")
    link = predict.parse_link("10Gbit")
    deep_cal = predict.calibrate(_synthetic(deep, 0.5, 0.02, (1, 2), usable=2))
    assert predict.predict(deep_cal, 8, 4, link).best == "kernel groups"
    paper_cal = predict.calibrate(_synthetic(PAPER_JOB, 0.6, 0.02, (1, 2), usable=2))
    assert predict.predict(paper_cal, 8, 4, link).best == "row bands"


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [("1Gbit", 1e9 / 8 * 0.94), ("25Gbit", 25e9 / 8 * 0.94), ("100Mbit", 1e8 / 8 * 0.94),
     ("10GbE", 10e9 / 8 * 0.94), ("1.25GB/s", 1.25e9)],
)  # fmt: skip
def test_parse_link(text: str, bytes_per_s: float) -> None:
    assert predict.parse_link(text) == (text, pytest.approx(bytes_per_s, rel=1e-12))


def test_a_colour_image_with_a_grayscale_bank_is_read_as_grayscale(tmp_path: Path) -> None:
    """As `rmidl run` does: the default bank is (K, kh, kw), and most photos are colour."""
    rng = np.random.default_rng(3)
    picture = tmp_path / "colour.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "out"
    code = cli.main(["bench", "--image", str(picture), "--kernels", "random:3x5x5", "--cores", "1",
                     "--runs", "1", "--out", str(out)])
    assert code == 0
    assert _results(out)["job"]["image_shape"] == [40, 56, 1]  # canonical (H, W, C)


def test_an_unusable_out_is_refused_before_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> StudyResult:
        raise AssertionError("the study ran although --out cannot be written")

    monkeypatch.setattr(study, "run_study", never)
    taken = tmp_path / "taken"
    taken.write_text("a file, not a directory\n")
    code = cli.main(["bench", *TINY, "--cores", "1", "--out", str(taken)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("rmidl: error:") and str(taken) in err[0], err


def test_bench_from_earlier_results_rewrites_the_report(cores_run: tuple[int, Path], tmp_path: Path) -> None:
    _, out = cores_run
    code = cli.main(
        ["bench", "--from", str(out), "--out", str(tmp_path), "--predict", "1,64", "--link", "25Gbit"]
    )
    assert code == 0
    again = _results(tmp_path)
    assert [c["times"] for c in again["configurations"]] == [
        c["times"] for c in _results(out)["configurations"]
    ]
    assert [p["nodes"] for p in again["prediction"]["points"]] == [1, 64]


def test_bench_runs_as_a_subprocess(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rmidl.client.cli", "bench", "--size", "40x30", "--kernels", "random:2x3x3",
         "--cores", "1", "--runs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"^1 core\s+1\s+[\d.e-]+\s+1\.000\s+100%$", done.stdout, re.MULTILINE), done.stdout
    assert "\r" not in done.stderr  # no progress bar when stderr is not a terminal
    assert {p.name for p in tmp_path.iterdir()} >= CORE_FILES - {"time_vs_workers.png"}
    assert math.isfinite(_results(tmp_path)["reference"]["seconds"])


def test_bench_runs_on_the_workers_of_a_given_name_server(tmp_path: Path) -> None:
    from rmidl.client.localcluster import LocalCluster

    with LocalCluster(workers=1, threads_per_worker=1) as cluster:
        code = _bench(tmp_path, "--cores", "1", "--ns", cluster.ns_address, "--runs", "1")
    assert code == 0
    configs = _results(tmp_path)["configurations"]
    assert [c["config"]["label"] for c in configs] == ["1 core", f"cluster at {cluster.ns_address}"]
    assert configs[1]["verified"] and configs[1]["details"]["workers"] == 1
    assert configs[1]["details"]["threads"] == 1  # one worker of one thread, no local threads
    efficiency = {row["configuration"]: row for row in _csv(tmp_path / "efficiency.csv")}
    assert efficiency[f"cluster at {cluster.ns_address}"]["threads"] == "1"
    assert f"cluster at {cluster.ns_address}" in _csv(tmp_path / "table3.csv")[0]


def test_worker_counts_with_a_name_server_choose_among_its_workers() -> None:
    configs = study.configurations(StudySettings(cores=(1,), workers=(0, 2), local_threads=1, ns="h:9"))
    assert [(c.kind, c.count, c.label) for c in configs] == [
        ("cores", 1, "1 core"),
        ("workers", 0, "0 workers"),  # the coordinator's local pool alone, as without --ns
        ("cluster", 2, "2 workers + 1 local at h:9"),
    ]


def test_bench_runs_each_worker_count_on_the_workers_of_a_name_server(
    tmp_path: Path, nameserver: str, start_worker: Callable[..., object]
) -> None:
    for name in ("w1", "w0"):  # registered out of name order: a count takes the first names
        start_worker(name=name)
    code = _bench(tmp_path, "--cores", "", "--ns", nameserver, "--workers", "1,2,3", "--runs", "1")
    assert code == 1  # the 3-worker configuration cannot be had: reported, not counted
    configs = _results(tmp_path)["configurations"]
    assert [c["config"]["label"] for c in configs] == [
        f"1 worker at {nameserver}", f"2 workers at {nameserver}", f"3 workers at {nameserver}"
    ]
    one, two, three = configs
    assert one["verified"] and one["details"]["workers"] == 1
    assert set(one["details"]["last_job"]["tasks_by"]) == {"w0"}
    assert two["verified"] and two["details"]["workers"] == 2
    assert set(two["details"]["last_job"]["tasks_by"]) <= {"w0", "w1"}
    assert three["failure"].startswith("WorkerNotFound: workers=3 but 2 registered") and not three["times"]


def _no_bigger_than(limit: int) -> Callable[[], None]:
    """preexec_fn: files of this process grow to `limit` bytes at most (then writes fail with EFBIG)."""
    import resource
    import signal

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_a_write_failing_half_way_keeps_the_earlier_results_json(cores_run: tuple[int, Path],
                                                                 tmp_path: Path) -> None:
    """The disk fills while results.json is written: the earlier one stays whole for --from to read."""
    _, earlier = cores_run
    out = tmp_path / "out"
    out.mkdir()
    before = (earlier / "results.json").read_bytes()
    (out / "results.json").write_bytes(before)
    assert len(before) > 4096  # over the limit below, so writing it fails part-way
    done = subprocess.run(
        [sys.executable, "-m", "rmidl.client.cli", "bench", "--from", str(out), "--out", str(out)],
        capture_output=True, text=True, timeout=100, check=False, preexec_fn=_no_bigger_than(4096),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"rmidl: error: cannot write '.*results\.json': File too large\n", done.stderr)
    assert (out / "results.json").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_plot_failing_half_way_keeps_the_earlier_plot(cores_run: tuple[int, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import errno

    from matplotlib.figure import Figure

    from rmidl.client.bench import plots
    from rmidl.errors import InputError

    def half_then_full(self: Figure, target: object, **kwargs: object) -> None:
        if hasattr(target, "write"):
            target.write(b"partial png")
        else:
            Path(str(target)).write_bytes(b"partial png")
        raise OSError(errno.ENOSPC, "No space left on device")

    _, earlier = cores_run
    result = StudyResult.from_dict(_results(earlier))
    plots.plot_speedup(result, tmp_path / "fig11_speedup.png")
    before = (tmp_path / "fig11_speedup.png").read_bytes()
    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(InputError, match=r"^cannot write '.*fig11_speedup\.png': No space left on device$"):
        plots.plot_speedup(result, tmp_path / "fig11_speedup.png")
    assert (tmp_path / "fig11_speedup.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig11_speedup.png"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_waiting_for_quiet_threads_sees_a_spinning_thread_and_its_end() -> None:
    stop, spinning = threading.Event(), threading.Event()
    block = bytes(8 << 20)

    def spin() -> None:  # hashing releases the GIL: the thread runs while the test's thread polls
        spinning.set()
        while not stop.is_set():
            hashlib.sha256(block)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        spinning.wait(5)
        assert not machine.wait_for_quiet_threads(timeout=0.2)
    finally:
        stop.set()
        spinner.join(5)
    assert machine.wait_for_quiet_threads(timeout=5)
