"""A native barrier for PyTorch distributed checkpointing.

``TCPStoreBarrier`` is a drop-in for
``torch.distributed.checkpoint._experimental.barriers.TCPStoreBarrier``:
same constructor, same store keys, with the barrier run in C++ without the
GIL. After ``import tcpstore_barrier``, torch's ``create_barrier_from_config``
knows it as ``barrier_type="tcp_store_native"``.
"""

from __future__ import annotations

import importlib.resources
import os

# The extension links libtorch; importing torch first loads it, so that
# `import tcpstore_barrier` works as the first import of a program.
import torch
import torch.distributed  # noqa: F401

from ._build_info import built_with_torch
from ._build_info import version as __version__
from ._compat import check_torch_version, load_extension

# Another torch minor is named as such, and so is any other failure of the
# loader (never a bare "undefined symbol").
check_torch_version(built_with_torch, torch.__version__)
load_extension(
    __name__, built_with_torch, torch.__version__, os.path.dirname(torch.__file__)
)

from ._barrier import TCPStoreBarrier  # noqa: E402
from ._errors import (  # noqa: E402
    BarrierTimeoutError,
    PeerLostError,
    StoreUnreachableError,
)
from ._registry import register_with_torch  # noqa: E402

TCPStoreBarrier.__module__ = __name__
register_with_torch(TCPStoreBarrier)

#: Pass with ``torch.utils.cmake_prefix_path`` in ``CMAKE_PREFIX_PATH`` so
#: that ``find_package(tcpstore_barrier CONFIG)`` finds the C++ package.
cmake_prefix_path: str = str(importlib.resources.files(__name__) / "lib" / "cmake")

__all__ = [
    "BarrierTimeoutError",
    "PeerLostError",
    "StoreUnreachableError",
    "TCPStoreBarrier",
    "__version__",
    "built_with_torch",
    "cmake_prefix_path",
]
