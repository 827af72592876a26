"""`gansentry serve --processes N`: real processes on one real port. Every child serves,
/metrics sums them all, a reload reaches all, a killed child is replaced without a failed
request, and start-up failures are one CLI error line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_models import IMAGE_MODEL, ModelRepo, add_version, b64, png_bytes, random_pixels
from tests.test_service_process import START_TIMEOUT_S, gansentry_serve, wait_ready

PNG = b64(png_bytes(random_pixels(28, 28, seed=3)))


def serving_children(supervisor: int) -> list[psutil.Process]:
    """The serving processes (not multiprocessing's resource tracker)."""
    return [
        c
        for c in psutil.Process(supervisor).children()
        if "spawn_main" in " ".join(c.cmdline()) and c.is_running()
    ]


def score_fresh(url: str, n: int, version: int | None = None) -> list[int]:
    """n requests, each on its own connection: the kernel spreads new connections over
    the processes, so n of them reach every process but with odds 2^-(n-1)."""
    statuses: list[int] = []
    body: dict = {"model": IMAGE_MODEL, "inputs": [{"image": PNG}]}
    if version is not None:
        body["version"] = version
    for _ in range(n):
        r = httpx.post(f"{url}/score", json=body, timeout=30)
        statuses.append(r.status_code)
    return statuses


def requests_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "gansentry_requests"
        for s in family.samples
        if s.name == "gansentry_requests_total" and s.labels["status"] == "200"
    )


def wait_children(supervisor: int, n: int) -> list[psutil.Process]:
    end = time.monotonic() + START_TIMEOUT_S
    while len(children := serving_children(supervisor)) != n:
        assert time.monotonic() < end, f"{len(children)} serving processes, not {n}"
        time.sleep(0.2)
    return children


def test_processes_share_the_port_metrics_reloads_and_restarts(
    mutable_repo: ModelRepo, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with gansentry_serve(mutable_repo.root, log, "--processes", "2") as (proc, url):
        wait_ready(proc, url, log)
        first, second = wait_children(proc.pid, 2)
        sent = 0
        assert score_fresh(url, 20) == [200] * 20
        sent += 20
        # Whichever process answers /metrics reports every process's requests.
        for _ in range(6):
            assert requests_total(url) == sent

        # Kill one: the other serves every new connection at once, and the supervisor
        # starts a replacement; then kill the other, so the replacement proves it serves.
        first.kill()
        first.wait(10)
        assert score_fresh(url, 10) == [200] * 10
        sent += 10
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            children = serving_children(proc.pid)
            if len(children) == 2 and all(
                httpx.get(f"{url}/readyz").status_code == 200 for _ in range(10)
            ):
                break
            assert time.monotonic() < end, "the killed process was not replaced"
            time.sleep(0.2)
        replacement = next(c for c in children if c.pid != second.pid)
        assert replacement.pid != first.pid
        time.sleep(1.0)  # let the replacement finish listening before the survivor goes
        second.kill()
        second.wait(10)
        assert score_fresh(url, 10) == [200] * 10
        sent += 10
        # The dead processes' counts stay in the sum: counters never go back.
        assert requests_total(url) == sent

        # A reload through the API reaches every process, not only the one that answered.
        wait_children(proc.pid, 2)
        wait_ready(proc, url, log)
        add_version(mutable_repo.root, IMAGE_MODEL, 1, 3)
        r = httpx.post(f"{url}/admin/reload", timeout=60)
        assert r.status_code == 200 and f"{IMAGE_MODEL}:3" in r.json()["loaded"]
        end = time.monotonic() + 30
        while score_fresh(url, 1, version=3) != [200]:
            assert time.monotonic() < end, "no process serves the new version"
            time.sleep(0.2)
        time.sleep(1.0)
        assert score_fresh(url, 20, version=3) == [200] * 20, log.read_text()[-3000:]

        children = serving_children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    text = log.read_text()
    assert "serving process" in text and "starting another" in text
    assert text.count("SIGHUP: reloading models") >= 2


def test_processes_refuse_a_taken_port_and_a_failed_start_in_one_line(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    base = [sys.executable, "-m", "gansentry.cli", "serve", "--processes", "2", "--host"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [*base, "127.0.0.1", "--port", str(port), "--models-dir", str(model_repo.root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(f"gansentry serve: error: cannot bind 127.0.0.1:{port}: ")
    )
    # Asking for CUDA where it does not load stops every child at start: the server exits
    # with one error line instead of restarting them for ever.
    log = tmp_path / "serve.log"
    flags = ("--processes", "2", "--providers", "cuda")
    with gansentry_serve(model_repo.root, log, *flags) as (proc, url):
        try:
            proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # CUDA really loads here: nothing to refuse
            assert httpx.get(f"{url}/readyz").status_code == 200
            return
    assert proc.returncode == 2
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("gansentry serve: error: serving process ")
    assert "before it was serving" in last
    assert "Traceback" not in log.read_text()


def test_each_process_gets_its_share_of_the_cpus() -> None:
    from service.settings import Settings, available_cpus

    cpus = available_cpus()
    assert Settings(processes=1).ort_threads() == cpus
    assert Settings(processes=2).ort_threads() == max(1, cpus // 2)
    assert Settings(processes=64).ort_threads() == max(1, cpus // 64)
    assert Settings(processes=2, intra_op_threads=3).ort_threads() == 3
