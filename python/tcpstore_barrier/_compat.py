"""Fails clearly when the installed torch is not the one we were built with."""

from __future__ import annotations


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def check_torch_version(built_with: str, running: str) -> None:
    """Raises ImportError unless both versions share major and minor.

    A C++ extension uses torch's C++ ABI, which changes between minor
    releases; importing across them fails with an undefined symbol or, worse,
    crashes later.
    """
    if _minor(built_with) != _minor(running):
        raise ImportError(
            f"tcpstore_barrier was built against torch {built_with} but torch "
            f"{running} is installed; rebuild it against this torch with "
            "`pip install --no-build-isolation --force-reinstall tcpstore-barrier`"
        )
