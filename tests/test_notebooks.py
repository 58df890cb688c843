"""The notebooks run top to bottom: offline ones on the bundled models, online ones (metadata
``qk_lens.online``) in a kernel whose hub is the tests' offline stand-in (``tests/fake_hub.py``)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    kwargs = {}
    if nb.metadata.get("qk_lens", {}).get("online"):
        from tests.fake_hub import offline_env

        kwargs["env"] = offline_env(tmp_path / "hub")  # the kernel reads the stand-in hub
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute(**kwargs)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
    if path.name.startswith("02"):  # the casebook: the graph view and the explorer inline
        html = [o["data"].get("text/html", "") for c in nb.cells if c.cell_type == "code"
                for o in c.get("outputs", []) if "data" in o]  # fmt: skip
        assert any('class="qkg"' in h and "application/json" in h for h in html)
        assert any('class="qkx"' in h and "application/json" in h for h in html)


def test_online_notebook_shows_the_explorer_inline(tmp_path):
    """Notebook 03 leaves the interactive explorer and the atlas figure as cell outputs."""
    from tests.fake_hub import offline_env

    path = next(p for p in NOTEBOOKS if p.name.startswith("03"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute(env=offline_env(tmp_path / "hub"))
    html = [o["data"].get("text/html", "") for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "data" in o]  # fmt: skip
    assert any('class="qkx"' in h and "application/json" in h for h in html)
    bundles = [o["data"] for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []) if "data" in o]  # fmt: skip
    assert any("application/vnd.plotly.v1+json" in b or "plotly" in str(b)[:2000] for b in bundles)
