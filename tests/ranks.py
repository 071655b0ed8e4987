"""Process-side half of the rank launcher in conftest.py.

Kept in a plain module so that forkserver children can import the targets
by name; test modules put their rank functions here or in their own module.
"""

from __future__ import annotations

import traceback


def rank_main(queue, target, rank, args):
    try:
        result = target(rank, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    else:
        queue.put((rank, True, result))
