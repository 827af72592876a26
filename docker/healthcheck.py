"""Container health probe for the gansentry images (stdlib only, so it needs nothing beyond
the image's Python).

`healthcheck.py URL` passes when URL answers 2xx. With `--max-heartbeat-age S` the body is read
as Prometheus text and the worker's `gansentry_worker_heartbeat_timestamp_seconds` must be
younger than S seconds: a worker whose HTTP thread lives on after its Redis loop died is
reported unhealthy, which a bare port check would miss."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

HEARTBEAT = "gansentry_worker_heartbeat_timestamp_seconds"


def heartbeat_age(metrics_text: str, now: float) -> float | None:
    for line in metrics_text.splitlines():
        if line.startswith(HEARTBEAT) and not line.startswith(HEARTBEAT + "_"):
            value = float(line.rsplit(None, 1)[-1])
            return now - value if value > 0 else None
    return None


def check(url: str, timeout: float, max_heartbeat_age: float | None) -> str | None:
    """Returns None when healthy, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return f"{url} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url} unreachable: {e}"
    if max_heartbeat_age is None:
        return None
    age = heartbeat_age(body, time.time())
    if age is None:
        return f"{url} has no {HEARTBEAT} yet"
    if age > max_heartbeat_age:
        return f"last heartbeat {age:.1f}s ago (limit {max_heartbeat_age:g}s)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--max-heartbeat-age", type=float, default=None)
    args = parser.parse_args(argv)
    problem = check(args.url, args.timeout, args.max_heartbeat_age)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
