"""A native barrier for PyTorch distributed checkpointing.

``TCPStoreBarrier`` is a drop-in for
``torch.distributed.checkpoint._experimental.barriers.TCPStoreBarrier``:
same constructor, same store keys, with the barrier run in C++ without the
GIL.
"""

from __future__ import annotations

import importlib.resources

# The extension links libtorch; importing torch first loads it, so that
# `import tcpstore_barrier` works as the first import of a program.
import torch  # noqa: F401
import torch.distributed  # noqa: F401

from ._C import TCPStoreBarrier, __version__, built_with_torch
from ._errors import BarrierTimeoutError

TCPStoreBarrier.__module__ = __name__

#: Pass with ``torch.utils.cmake_prefix_path`` in ``CMAKE_PREFIX_PATH`` so
#: that ``find_package(tcpstore_barrier CONFIG)`` finds the C++ package.
cmake_prefix_path: str = str(importlib.resources.files(__name__) / "lib" / "cmake")

__all__ = [
    "BarrierTimeoutError",
    "TCPStoreBarrier",
    "__version__",
    "built_with_torch",
    "cmake_prefix_path",
]
