"""`gansentry serve` and `gansentry worker`.

Flags override `GANSENTRY_*` environment variables, which override the defaults in
`service.settings.Settings`; a flag left out keeps the environment's value. The service
modules are imported only when a command runs, so `gansentry --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PROVIDERS = ("auto", "tensorrt", "cuda", "cpu")

# argparse dest -> Settings field, for the flags both commands share.
_COMMON = {
    "models_dir": "models_dir",
    "providers": "providers",
    "max_batch_size": "max_batch_size",
    "max_batch_delay_ms": "max_batch_delay_ms",
    "redis_url": "redis_url",
}


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve the models over HTTP (POST /score)",
        description="Start the scoring API with uvicorn: one process, or --processes N on one "
        "port; scale out with replicas (or GANSENTRY_REDIS_URL and `gansentry worker` "
        "processes).",
    )
    serve.add_argument(
        "--batching",
        help="batching backend, embedded or redis (GANSENTRY_BATCHING; default redis when a "
        "Redis URL is set, else embedded)",
    )
    serve.add_argument("--host", help="bind address (GANSENTRY_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (GANSENTRY_PORT, default 8000)")
    serve.add_argument(
        "--processes",
        type=int,
        help="serving processes sharing the port, each with its share of the CPUs "
        "(GANSENTRY_PROCESSES, default 1; on a CPU, one per core serves small models fastest)",
    )
    _add_common(serve)
    serve.add_argument(
        "--api-keys-file",
        type=Path,
        help="file with one API key per line (GANSENTRY_API_KEYS_FILE)",
    )
    serve.add_argument(
        "--admin-keys-file",
        type=Path,
        help="file with one admin key per line, for /admin/* (GANSENTRY_ADMIN_KEYS_FILE); "
        "without admin keys /admin/* answers only to loopback clients",
    )
    serve.add_argument("--log-level", help="uvicorn log level (GANSENTRY_LOG_LEVEL, default info)")
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (costs throughput)"
    )
    serve.set_defaults(run=run_serve)

    worker = sub.add_parser(
        "worker",
        help="score requests queued in Redis (GANSENTRY_REDIS_URL)",
        description="A batching worker for the Redis backend: reads the per-model streams, "
        "runs ONNX Runtime, writes results back. Run as many as the hardware allows.",
    )
    _add_common(worker)
    worker.add_argument(
        "--metrics-port", type=int, help="Prometheus port (GANSENTRY_WORKER_METRICS_PORT)"
    )
    worker.add_argument("--name", help="consumer name in Redis (default: host and pid)")
    worker.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads (GANSENTRY_INTRA_OP_THREADS)"
    )
    worker.set_defaults(run=run_worker)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, help="model repository (GANSENTRY_MODELS_DIR)")
    p.add_argument(
        "--providers", choices=PROVIDERS, help="ONNX Runtime providers (GANSENTRY_PROVIDERS)"
    )
    p.add_argument(
        "--max-batch-size", type=int, help="inputs per ONNX Runtime call (GANSENTRY_MAX_BATCH_SIZE)"
    )
    p.add_argument(
        "--max-batch-delay-ms",
        type=float,
        help="longest wait for a batch to fill (GANSENTRY_MAX_BATCH_DELAY_MS)",
    )
    p.add_argument("--redis-url", help="use the Redis queue backend (GANSENTRY_REDIS_URL)")


def settings_from_args(args: argparse.Namespace, extra: dict[str, str]) -> Any:
    """Settings from the environment, with every flag that was given on top."""
    from pydantic import ValidationError

    from gansentry.cli import CliError
    from service.settings import Settings

    names = {**_COMMON, **extra}
    given = {
        field: getattr(args, dest)
        for dest, field in names.items()
        if getattr(args, dest, None) is not None
    }
    try:
        settings = Settings(**given)
        # Read the key files now, not at the first request.
        _ = settings.keys
        _ = settings.admin_key_set
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise CliError(f"invalid setting {where}: {message}" if where else message) from None
    except OSError as e:
        raise CliError(f"cannot read a keys file: {e}") from None
    if not Path(settings.models_dir).is_dir():
        raise CliError(f"models directory {settings.models_dir} does not exist")
    return settings


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gansentry.cli import CliError
    from service.app import create_app, start_error
    from service.processes import StartError, Supervisor

    settings = settings_from_args(
        args,
        {
            "batching": "batching",
            "host": "host",
            "port": "port",
            "processes": "processes",
            "api_keys_file": "api_keys_file",
            "admin_keys_file": "admin_keys_file",
            "log_level": "log_level",
        },
    )
    if settings.processes > 1:
        try:
            return Supervisor(settings, access_log=args.access_log).run()
        except StartError as e:
            raise CliError(str(e)) from None
    app = create_app(settings)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=10,
        )
    except SystemExit:  # uvicorn's exit when the application did not start
        reason = start_error(app.state)
        if reason is not None:
            raise CliError(reason) from None
        raise
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from gansentry.cli import CliError
    from service.batching.redis import worker

    settings = settings_from_args(
        args,
        {
            "metrics_port": "worker_metrics_port",
            "name": "worker_name",
            "threads": "intra_op_threads",
        },
    )
    if not settings.redis_url:
        raise CliError("a worker needs --redis-url or GANSENTRY_REDIS_URL")
    return worker.run_worker(settings)
