"""Both supported stacks run this suite: (a) TransformerLens 3.9 + SAELens, everything; (b)
TransformerLens 4 without SAELens, where the modules below, written against HookedTransformer
test models (tests/archs.py), cannot be imported. Everything else runs there on bridges."""

from __future__ import annotations

import os

from qk_lens.toy import hooked_transformer_available

HOOKED_ONLY = [
    "test_archs.py",
    "test_pretrained.py",
]
STACK = (
    "a (TransformerLens 3 + SAELens)" if hooked_transformer_available() else "b (TransformerLens 4)"
)
# QK_LENS_COLLECT_ALL=1 collects them anyway (while porting a module to bridges).
collect_ignore = (
    [] if STACK.startswith("a") or os.environ.get("QK_LENS_COLLECT_ALL") else HOOKED_ONLY
)


def pytest_report_header(config) -> str:
    from importlib.metadata import version

    skipped = f"; not collected here: {', '.join(collect_ignore)}" if collect_ignore else ""
    return f"qk_lens stack {STACK}: transformer-lens {version('transformer-lens')}{skipped}"
