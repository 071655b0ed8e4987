"""What the tests share: launch.py (the one way to run ranks), barriers.py
(constructor arguments, error descriptions, the barrier property), netns.py
(network-namespace hosts and the programs run inside them); and here, ports
and figures."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def report_figure(name, value):
    """A measured figure, shown by ``pytest -s`` as ``FIGURE name: value``."""
    print(f"FIGURE {name}: {value:.3f}")
