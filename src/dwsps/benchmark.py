"""``dwsps bench``: load scenarios against a running server (filled in by the benchmark work)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``dwsps bench`` options on ``parser``."""
    parser.add_argument("scenario", nargs="?", default="fanout")


def run(args: argparse.Namespace) -> int:
    """Run ``dwsps bench``; return the process exit code."""
    raise SystemExit("dwsps bench is not implemented yet")
