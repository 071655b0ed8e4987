"""Argument types and parser set-up shared by the bench commands.

Each type rejects a bad value with argparse's own error, naming the option.
The types keep their leading underscores: for text that does not parse at
all argparse prints the function's name ("invalid _positive_int value:
'x'"), and that message is part of the commands' output.
"""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def describe(
    parser: argparse.ArgumentParser, description: str, epilog: str | None = None
) -> None:
    """Give ``parser`` its help text, printed as written (our line breaks and
    indented lists are the layout)."""
    parser.description = description
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
