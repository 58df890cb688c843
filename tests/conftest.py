"""Both supported stacks run this suite: (a) TransformerLens 3.9 + SAELens, everything; (b)
TransformerLens 4 without SAELens, where the two modules below, about HookedTransformer itself,
cannot run. Everything else runs there, on bridges."""

from __future__ import annotations

import os

from qk_lens.toy import hooked_transformer_available

HOOKED_ONLY = [
    # HookedTransformer variants against a reference written from their configs; the bridges'
    # counterpart, against their own hooks, is test_bridge.py
    "test_archs.py",
    # HookedTransformer.from_pretrained through the fake hub; on stack (b)
    # test_sae_files.py boots the same fake "gpt2" as a bridge with the release's SAE
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
