"""Makes torch's checkpoint barrier registry know our barrier.

Importing torch's experimental checkpoint package takes about two seconds,
so it is never imported for this: if the program has imported it, the
barrier is registered now, otherwise the moment the program imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

BARRIERS_MODULE = "torch.distributed.checkpoint._experimental.barriers"


def _register(module, barrier_class) -> None:
    module.BARRIER_REGISTRY[barrier_class.barrier_type] = barrier_class
    module.Barrier.register(barrier_class)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, barrier_class) -> None:
        self._barrier_class = barrier_class

    def find_spec(self, fullname, path, target=None):
        if fullname != BARRIERS_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        barrier_class = self._barrier_class

        def exec_then_register(module):
            exec_module(module)
            _register(module, barrier_class)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def register_with_torch(barrier_class) -> None:
    module = sys.modules.get(BARRIERS_MODULE)
    if module is not None:
        _register(module, barrier_class)
    else:
        sys.meta_path.insert(0, _RegisterOnImport(barrier_class))
