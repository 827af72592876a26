"""The one console script. Each subcommand's module registers its own arguments and is
imported here without torch; training code imports torch only when a command runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from gansentry import __version__


class CliError(Exception):
    """Raised by a command for bad input: printed as one line, exit status 2."""


Command = Callable[[argparse.Namespace], int | None]


def build_parser() -> argparse.ArgumentParser:
    from gansentry import score as score_cli
    from service import cli as service_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="gansentry", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gansentry {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_cli.register(sub)
    score_cli.register(sub)
    service_cli.register(sub)
    return parser


def configure_logging(level: int) -> None:
    """The one log format of every gansentry process (`serve --processes` children too)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    run: Command = args.run
    try:
        return int(run(args) or 0)
    except CliError as e:
        print(f"gansentry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gansentry {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Under `python -m` this file is `__main__`; run the importable module so the CliError
    # that subcommands raise is the class main() catches.
    from gansentry.cli import main as _main

    sys.exit(_main())
