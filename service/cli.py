"""`gansentry serve` and `gansentry worker`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Filled in by the service's commands."""
