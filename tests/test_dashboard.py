"""The status page: its JSON shows a live cluster's workers and a running job published by a coordinator
through the name server, then that job's task timeline; the page renders them in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from worker_doubles import GatedWorker

from rmidl.client import Coordinator, serve_dashboard
from rmidl.errors import OptionError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"] == "application/json"
        return json.loads(reply.read())


@pytest.fixture
def live_job(nameserver, start_worker, cluster_config, rng):
    """Workers "gated" and "fast" and a job running on them from a Coordinator in a thread, held live
    until `release()`: the gated worker's tasks wait. Yields (ns, coordinator, release, wait_done)."""
    config = cluster_config.replace(task_deadline_floor=120.0)  # the held task must not be quarantined
    # the gated worker alone when the job starts, so it surely takes a task; "fast" joins mid-job
    gated = start_worker(name="gated", worker_class=GatedWorker, config=config)
    image = rng.standard_normal((120, 90)).astype(np.float32)
    bank = rng.standard_normal((6, 5, 5)).astype(np.float32)
    coordinator = Coordinator(nameserver, config=config, local_threads=0, min_tasks=8)
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            coordinator.correlate(image, bank)
        except BaseException as error:
            failure.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert gated.worker.waiting.wait(30), "the gated worker never got its first task"
    start_worker(name="fast", config=config)

    def wait_done() -> None:
        assert done.wait(60) and not failure, failure

    try:
        yield nameserver, coordinator, gated.worker.gate.set, wait_done
    finally:
        gated.worker.gate.set()
        thread.join(60)
        coordinator.close()


def test_the_status_json_shows_workers_and_a_live_job_then_its_timeline(live_job, cluster_config,
                                                                        wait_until) -> None:
    ns, coordinator, release, wait_done = live_job
    with serve_dashboard(ns, config=cluster_config, interval=0.05) as page:
        api = page.url + "api/status"

        def running() -> dict | None:
            data = fetch_json(api)
            jobs = [job for job in data["jobs"] if job["state"] == "running"]
            return data if jobs and jobs[0]["in_flight"].get("gated") else None

        data = wait_until(running, what="the running job on the page")
        assert data["ns"] == ns and data["error"] is None
        assert sorted(w["name"] for w in data["workers"]) == ["fast", "gated"]
        assert all(w["state"] in ("idle", "busy") and w["threads"] == 1 for w in data["workers"])
        job = data["jobs"][0]
        assert job["kind"] == "correlate" and job["done"] < job["total"]
        assert job["coordinator"].startswith("rmidl.coordinator.")
        assert any(row[1] == "gated" and row[4] == "running" for row in job["tasks"])
        release()
        wait_done()

        def finished() -> dict | None:
            jobs = fetch_json(api)["jobs"]
            return jobs[0] if jobs and jobs[0]["state"] == "done" else None

        job = wait_until(finished, what="the finished job on the page")
    assert job["done"] == job["total"] == coordinator.last_job()["tasks"]
    assert job["by_runner"] == coordinator.stats()
    done_rows = [row for row in job["tasks"] if row[4] == "done"]
    assert len(done_rows) == job["total"] and {row[0] for row in done_rows} == set(range(job["total"]))
    assert {row[1] for row in done_rows} == set(coordinator.stats())


def test_the_page_is_self_contained_and_answers_loopback_names_only(nameserver, cluster_config) -> None:
    with serve_dashboard(nameserver, config=cluster_config) as page:
        with urllib.request.urlopen(page.url, timeout=10) as reply:
            html = reply.read().decode("utf-8")
        # offline: no external scripts, styles, fonts or images (the SVG namespace is a name, not a fetch)
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", html)
        initial = re.search(r'<script id="initial" type="application/json">(.*?)</script>', html, re.S)
        assert initial and json.loads(initial.group(1))["ns"] == nameserver
        # a page elsewhere reaching us through a DNS name pointed at 127.0.0.1 (DNS rebinding)
        rebound = urllib.request.Request(page.url + "api/status",
                                         headers={"Host": f"evil.example:{page.port}"})
        for request, status in ((page.url + "nope", 404), (rebound, 403)):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=10)
            info.value.close()
            assert info.value.code == status
    with pytest.raises(OptionError, match="dashboard port"):
        serve_dashboard(nameserver, port=70000)


def test_a_coordinator_serves_its_own_page(nameserver, start_worker, cluster_config, rng) -> None:
    start_worker(name="w1")
    image = rng.standard_normal((64, 64)).astype(np.float32)
    with Coordinator(nameserver, config=cluster_config, local_threads=1, dashboard_port=0) as co:
        co.correlate(image, rng.standard_normal((3, 3, 3)).astype(np.float32))
        data = fetch_json(co.dashboard_url + "api/status")
    jobs = [job for job in data["jobs"] if job["state"] == "done"]
    # its own jobs once (from its board, not again from its feed in the name server)
    assert len(jobs) == 1 and jobs[0]["coordinator"] == "this process"
    assert [w["name"] for w in data["workers"]] == ["w1"]


def _chromium(url: str, user_data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={user_data}", "--window-size=1280,900", *extra, url],
        capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_workers_and_the_live_job(live_job, cluster_config, tmp_path,
                                                                wait_until) -> None:
    from PIL import Image

    ns, _, release, wait_done = live_job
    with serve_dashboard(ns, config=cluster_config, interval=0.05) as page:
        api = page.url + "api/status"
        wait_until(lambda: any(job["state"] == "running" for job in fetch_json(api)["jobs"]),
                   what="the running job on the page")
        dom = _chromium(page.url, tmp_path / "profile", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        shot = tmp_path / "page.png"
        done = _chromium(page.url, tmp_path / "profile", f"--screenshot={shot}")
        assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    release()
    wait_done()
    # the DOM after the page's script ran: a row per worker, the running job with its progress, the strip
    for name in ("fast", "gated"):
        assert re.search(rf'<tr data-worker="{name}" data-state="(idle|busy)">', html), name
    job = re.search(r'<div class="job" data-job="correlate #1" data-state="running">(.*?)</div></div>', html,
                    re.S)
    assert job and re.search(r"\d+ of \d+ tasks", job.group(1))
    assert re.search(r'<svg [^>]*data-job="correlate #1"', html)
    assert re.search(r'<rect [^>]*class="task running"', html) and "gated" in html
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert image.shape == (900, 1280, 3)
    assert image.std() > 20  # not a blank page
    # the running job's colour (its pill, its attempt on the strip) and the dark header bar are on screen
    running = np.all(np.abs(image - (0x20, 0xA3, 0x86)) < 12, axis=2).sum()
    header = np.all(np.abs(image - (0x24, 0x3B, 0x53)) < 6, axis=2).sum()
    assert running > 50 and header > 10_000, (running, header)


def test_rmidl_dashboard_serves_until_stopped(nameserver, start_worker, children) -> None:
    start_worker(name="w1")
    page = children("rmidl", "dashboard", "--ns", nameserver, "--port", "0")
    lines = page.read_until("ready")
    url = re.search(r"^dashboard (http://127\.0\.0\.1:\d+/) for ", lines[-2])
    assert url, lines
    data = fetch_json(url.group(1) + "api/status")
    assert [w["name"] for w in data["workers"]] == ["w1"] and data["ns"] == nameserver
    assert page.stop()[0] == 0


@pytest.mark.slow
def test_rmidl_up_gives_metrics_ports_and_a_page_that_shows_a_job_run_elsewhere(rng, scrape,
                                                                                 wait_until) -> None:
    import os

    from rmidl.client.localcluster import Process

    up = Process("up", ["up", "--workers", "1", "--metrics-port", "0", "--dashboard", "0"],
                 {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        text = "\n".join(up.wait_ready(90))
        urls = dict(re.findall(r"^metrics of (\S+): (http://127\.0\.0\.1:\d+/metrics)$", text, re.M))
        page = re.search(r"^dashboard (http://127\.0\.0\.1:\d+/)$", text, re.M)
        assert set(urls) == {"ns", "w1"} and page, text
        # a job from this process, as `rmidl run` would: the local cluster found through its cluster file
        with Coordinator() as co:
            co.correlate(rng.standard_normal((80, 80)).astype(np.float32),
                         rng.standard_normal((4, 5, 5)).astype(np.float32))
            stats = co.stats()
        samples = scrape(urls["w1"])
        assert samples[("rmidl_worker_tasks_total", frozenset(
            {("worker", "w1"), ("method", "correlate"), ("outcome", "done")}))] == stats["w1"]
        assert scrape(urls["ns"])[("rmidl_ns_registrations", frozenset({("role", "worker")}))] == 1

        def shown() -> dict | None:
            jobs = fetch_json(page.group(1) + "api/status")["jobs"]
            return jobs[0] if jobs and jobs[0]["state"] == "done" else None

        job = wait_until(shown, what="the job on the page of `rmidl up`")
        assert job["by_runner"] == stats and job["coordinator"].startswith("rmidl.coordinator.")
    finally:
        assert up.stop(15) == 0


def _register_feed(ns_proxy, name: str, updated: float, state: str = "done", text: str | None = None) -> None:
    from rmidl.client.jobfeed import FEED_TAGS

    feed = {"coordinator": name, "host": "h", "pid": 1, "updated": updated,
            "jobs": [{"id": 1, "kind": "correlate", "state": state, "total": 1, "done": 0}]}
    body = text if text is not None else json.dumps(feed)
    ns_proxy.register(name, f"PYRO:{name}@localhost:0", metadata=[*sorted(FEED_TAGS), "jobs:" + body])


def test_feeds_stale_unreadable_and_pruned(nameserver, start_worker, cluster_config, rng) -> None:
    import os
    import time

    from rmidl.client.jobfeed import FEED_PREFIX, KEEP_FEEDS, STALE, read_feeds
    from rmidl.remote.transport import connect_ns

    start_worker(name="w1")
    with connect_ns(nameserver, cluster_config) as registry:
        now = time.time()
        _register_feed(registry, FEED_PREFIX + "gone-1", now - STALE - 1, state="running")
        _register_feed(registry, FEED_PREFIX + "garbled", now, text="{not json")
        for i in range(KEEP_FEEDS + 3):
            _register_feed(registry, f"{FEED_PREFIX}old-{i:02d}", now - 1000 + i)
        feeds = {feed["coordinator"]: feed for feed in read_feeds(registry)}
        assert FEED_PREFIX + "garbled" not in feeds  # skipped, not an error
        assert feeds[FEED_PREFIX + "gone-1"]["jobs"][0]["state"] == "stale"  # its coordinator died
        with Coordinator(nameserver, config=cluster_config, local_threads=0):
            pass  # ran no job: publishes nothing
        assert len(read_feeds(registry)) == KEEP_FEEDS + 4
        with Coordinator(nameserver, config=cluster_config, local_threads=0) as co:
            co.correlate(rng.standard_normal((32, 32)).astype(np.float32),
                         rng.standard_normal((2, 3, 3)).astype(np.float32))
        left = sorted(read_feeds(registry), key=lambda feed: -feed["updated"])
    assert len(left) == KEEP_FEEDS and left[0]["pid"] == os.getpid()
    assert left[0]["jobs"][0]["state"] == "done" and left[0]["jobs"][0]["by_runner"] == {"w1": 1}
    assert FEED_PREFIX + "old-00" not in {feed["coordinator"] for feed in left}  # the oldest went
