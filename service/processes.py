"""`gansentry serve --processes N`: N serving processes on one port, kept alive by this one.

Why processes: on a CPU, a small model is cheaper to run than the HTTP, JSON and image
work around it, and that work runs on one event loop per process (the GIL). One process
cannot keep ONNX Runtime fed on more than about one core's worth of requests; N processes,
each with its own batcher and ONNX Runtime sessions (its share of the CPUs as intra-op
threads), use them all. On a GPU one process usually suffices and N processes hold N
copies of every model in GPU memory.

How: every child binds the port with SO_REUSEPORT, so the kernel spreads new connections
over the children that are listening; this process binds it first, without listening, so
a port taken by another program is one clear error, not N crashed children. Counters and
histograms go to Prometheus's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, a directory
this process creates and removes), so `/metrics` on any child reports the sum of all.
SIGHUP and `POST /admin/reload` reach every child; a child that dies is started again
unless it died before it was serving, which stops the server (a model or setting that
cannot load fails every try alike)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event
from typing import Any

from service.settings import Settings

log = logging.getLogger("gansentry.service")

SUPERVISOR_ENV = "GANSENTRY_SUPERVISOR_PID"
STOP_TIMEOUT_S = 20.0


class StartError(RuntimeError):
    """The port cannot be bound or a child failed while starting."""


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def ask_supervisor_to_reload() -> bool:
    """From a child: have the supervisor pass SIGHUP to every child (the asking one reloads
    again, which finds nothing new). False when this process has no supervisor."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is None or int(supervisor) != os.getppid():
        return False
    os.kill(int(supervisor), signal.SIGHUP)
    return True


def _child(fields: dict[str, Any], access_log: bool, log_level: int, serving: Event) -> None:
    """One serving process. Its own process group, so a terminal's Ctrl-C reaches only the
    supervisor, which stops the children once and gracefully."""
    import uvicorn

    from gansentry.cli import configure_logging
    from service.app import create_app

    configure_logging(log_level)
    os.setpgrp()
    supervisor = os.getppid()

    def orphaned() -> None:  # the supervisor was killed: stop rather than serve unsupervised
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True, name="supervisor-watch").start()
    settings = Settings(**fields)
    sock = reuseport_socket(settings.host, settings.port)
    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level,
        access_log=access_log,
        timeout_graceful_shutdown=10,
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # models loaded, socket listening
                serving.set()

    Server(config).run(sockets=[sock])


class Supervisor:
    def __init__(self, settings: Settings, access_log: bool) -> None:
        self.settings = settings
        self.access_log = access_log
        self.children: dict[int, tuple[multiprocessing.Process, Event]] = {}
        self.stopping = False
        # Children asked to reload before they were serving: SIGHUP would kill them then
        # (its default action), so they get it once they serve.
        self.reload_pending: set[int] = set()
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        s = self.settings
        try:
            holder = reuseport_socket(s.host, s.port)
        except OSError as e:
            raise StartError(f"cannot bind {s.host}:{s.port}: {e.strerror or e}") from None
        metrics_dir = tempfile.mkdtemp(prefix="gansentry-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        log.info("serving on %s:%d with %d processes", s.host, s.port, s.processes)
        try:
            for slot in range(s.processes):
                self._start(slot)
            return self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            holder.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _start(self, slot: int) -> None:
        fields = self.settings.model_dump()
        serving = self._context.Event()
        proc = self._context.Process(
            target=_child,
            args=(fields, self.access_log, logging.getLogger().level, serving),
            name=f"gansentry-serve-{slot}",
        )
        proc.start()
        self.children[slot] = (proc, serving)

    def _watch(self) -> int:
        from prometheus_client import multiprocess

        while not self.stopping:
            sentinels = [proc.sentinel for proc, _ in self.children.values()]
            wait(sentinels, timeout=0.5)
            for slot in list(self.reload_pending):
                proc, serving = self.children[slot]
                if serving.is_set() and proc.is_alive():
                    self.reload_pending.discard(slot)
                    os.kill(proc.pid, signal.SIGHUP)  # type: ignore[arg-type]
            for slot, (proc, serving) in list(self.children.items()):
                if proc.is_alive() or self.stopping:
                    continue
                multiprocess.mark_process_dead(proc.pid)
                if not serving.is_set():
                    raise StartError(
                        f"serving process {slot} exited with code {proc.exitcode} before it "
                        "was serving (its log is above)"
                    )
                log.warning(
                    "serving process %d (pid %s) exited with code %s; starting another",
                    slot, proc.pid, proc.exitcode,
                )  # fmt: skip
                self._start(slot)
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            for slot, (proc, serving) in self.children.items():
                if serving.is_set() and proc.is_alive():
                    os.kill(proc.pid, signal.SIGHUP)  # type: ignore[arg-type]
                else:
                    self.reload_pending.add(slot)
            return
        self.stopping = True

    def _stop_all(self) -> None:
        self.stopping = True
        for proc, _ in self.children.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        end = time.monotonic() + STOP_TIMEOUT_S
        for proc, _ in self.children.values():
            proc.join(max(end - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
