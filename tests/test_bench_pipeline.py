"""The pipeline study: its model (Eq. (2) as printed, the bottleneck formula), a tiny real run, the CLI."""

from __future__ import annotations

import json

import pytest

from rmidl.client.bench.pipeline_model import bottleneck_speedup, eq2_speedup, paper_predictions, predict
from rmidl.client.bench.pipeline_report import speedup_rows, table3_rows
from rmidl.client.bench.pipeline_study import PipelineSettings, run_pipeline_study
from rmidl.datasets import open_dataset
from rmidl.errors import OptionError
from rmidl.network import Network


def test_the_bottleneck_formula_by_hand() -> None:
    times = [1.0, 2.0, 1.0]
    assert bottleneck_speedup(times, 1) == 1.0  # one item: nothing overlaps
    assert bottleneck_speedup(times, 3) == pytest.approx(12 / (4 + 2 * 2))  # makespan 4 + (3 - 1) x 2
    assert bottleneck_speedup(times, 10**6) == pytest.approx(2.0, rel=1e-5)  # sum / slowest
    assert bottleneck_speedup(times, 10**6, replicas=[1, 2, 1]) == pytest.approx(4.0, rel=1e-5)
    assert bottleneck_speedup(times, 10**6, replicas=[1, 2, 1], cores=2) == pytest.approx(2.0, rel=1e-5)
    # two pipelines halve the items each runs; on 8 cores nothing else binds
    assert bottleneck_speedup(times, 4, pipelines=2, cores=8) == pytest.approx(16 / (4 + 1 * 2))
    # Eq. (2) as printed takes the last stage's time for the interval: right only when it is the slowest
    assert eq2_speedup(times, 10**6) == pytest.approx(4.0, rel=1e-5)
    assert eq2_speedup([1.0, 1.0, 2.0], 3) == bottleneck_speedup([1.0, 1.0, 2.0], 3)


def test_the_papers_own_numbers_through_the_corrected_formula() -> None:
    paper = paper_predictions()
    assert paper["corrected_pipelined"] == pytest.approx(38 / 23)  # ~1.6x, the figure
    assert paper["corrected_combined"] == pytest.approx(6 * 38 / 23)  # ~10x
    assert round(paper["corrected_pipelined"], 1) == 1.7 and round(paper["corrected_combined"]) == 10
    assert (paper["claimed_pipelined"], paper["claimed_combined"]) == (3.0, 18.0)


def test_predictions_count_replicated_stages_and_the_cores() -> None:
    stages = {"LOAD": 1.0, "CNP1": 4.0, "CNP2": 2.0, "FLAT": 0.1}
    one, both = predict(stages, 10**6, cores=4, replicas=[2, 1], pipelines=2, measured={"pipelined": 2.9})
    assert one.bottleneck == pytest.approx(7.1 / 2.0, rel=1e-4)  # CNP1 split in two: CNP2 is the bottleneck
    assert one.on_cores == pytest.approx(one.bottleneck)  # 7.1 / 4 cores does not bind
    assert one.eq2 == pytest.approx(71.0, rel=1e-3)
    assert one.measured_over_predicted == pytest.approx(2.9 / 3.55, rel=1e-3)
    assert both.on_cores == pytest.approx(4.0, rel=1e-4) and both.measured is None  # 2 x 3.55 > 4 cores


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from conftest import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("study"), per_class=5, shape=(32, 30))
    net = Network.from_spec("3x5x5:relu:max2,3x3x3:relu:max2:dw")
    settings = PipelineSettings(batch=2, runs=2, warmup=0, workers=(1,), pipelines=2)
    return run_pipeline_study(open_dataset(root), net, settings)


def test_a_small_study_runs_every_scheme_and_checks_it(study) -> None:
    assert [s["name"] for s in study["schemes"]] == ["pipelined", "combined (2 pipelines)", "1 worker"]
    assert all(s["failure"] is None and len(s["times"]) == 2 and s["max_abs_error"] == 0.0
               for s in study["schemes"])
    assert study["stages"] == ["LOAD", "CNP1", "CNP2", "FLAT"]
    assert study["table3"]["batches"] == 5 and set(study["table3"]["seconds"]) == set(study["stages"])
    assert all(v >= 0 for v in study["table3"]["seconds"].values()) and study["table3"]["seconds"]["CNP1"] > 0
    spans = study["schemes"][0]["spans"]
    assert {s[0] for s in spans} == set(study["stages"]) and len(spans) == 4 * 5
    assert {s[1] for s in study["schemes"][2]["spans"]} == {"w1"}
    measured = {p["scheme"]: p["measured"] for p in study["predictions"]}
    pipelined = study["sequential"]["median"] / study["schemes"][0]["median"]
    assert measured["pipelined"] == pytest.approx(pipelined)
    json.dumps(study, allow_nan=False)  # results are plain JSON


def test_the_report_puts_the_papers_numbers_beside_ours(study, tmp_path) -> None:
    from rmidl.client.bench import pipeline_report, plots

    rows = table3_rows(study)
    assert [r[0] for r in rows] == ["LOAD", "CNP1", "CNP2", "FLAT", "**total**"]
    assert rows[1][4] == "23" and rows[3][4] == "0.05" and rows[4][4] == "38"
    speedups = {r[0]: r for r in speedup_rows(study)}
    assert speedups["paper: pipelined"][1:3] == ["3.00 (stated)", "1.65"]
    assert speedups["paper: 6 pipelines"][1:3] == ["18.00 (stated)", "9.91"]
    written = {p.name for p in pipeline_report.write_pipeline_report(study, tmp_path)}
    expected = {"table3.md", "table3.csv", "speedup.md", "speedup.csv", "schemes.md", "schemes.csv",
                "pipeline.json"}
    assert written >= expected
    if plots.unavailable() is None:
        assert {"gantt.png", "speedup.png"} <= written
    assert json.loads((tmp_path / "pipeline.json").read_text())["paper"]["total_seconds"] == 38.0


def test_bench_pipeline_from_the_command_line(tmp_path, capsys) -> None:
    from rmidl.client.cli import main

    code = main(["bench", "pipeline", "--images", "6", "--size", "24", "--net", "2x3x3:relu:max2", "--batch",
                 "2", "--runs", "1", "--warmup", "0", "--workers", "1", "--pipelines", "1", "--out",
                 str(tmp_path / "out"), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Eq. (2) as printed" in captured.out and "paper: 6 pipelines" in captured.out
    assert (tmp_path / "out" / "table3.md").exists()


@pytest.mark.parametrize(("settings", "text"), [
    (PipelineSettings(replicas=(1, 1)), "each of the 1 CNP stages"),
    (PipelineSettings(runs=0), "at least 1"),
    (PipelineSettings(workers=(0,)), "worker counts must be at least 1"),
])
def test_bad_study_settings_are_refused_before_any_run(image_folder, settings, text) -> None:
    with pytest.raises(OptionError, match=text):
        run_pipeline_study(open_dataset(image_folder), Network.from_spec("2x3x3"), settings)
