"""Module paths that moved in the 0.2 layout keep working for a release, with a DeprecationWarning.

``import qk_lens.contrast`` (and ``from qk_lens.contrast import ...``) gets the module that now
lives at ``qk_lens.attribution.contrast``, and so on for :data:`MOVED`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = {
    "qk_lens.attention": "qk_lens.arch.qk",
    "qk_lens.contrast": "qk_lens.attribution.contrast",
    "qk_lens.table": "qk_lens.attribution.table",
    "qk_lens.topk_terms": "qk_lens.attribution.topk",
    "qk_lens.loadings": "qk_lens.graph.loadings",
    "qk_lens.export": "qk_lens.graph.export",
    "qk_lens.patterns": "qk_lens.atlas.probes",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in MOVED:
            return None
        new = MOVED[name]
        warnings.warn(
            f"{name} moved to {new}; the old path will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(name, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
