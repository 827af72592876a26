"""`gansentry train|evaluate|export`. Arguments are declared here without importing torch;
each command imports the training code only when it runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Filled in by the training package's commands."""
