"""Figures in a real Jupyter kernel: every sharpscope plot is shown, not only the first."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_each_plot_in_a_notebook_is_displayed(monkeypatch):
    """The inline backend loads at the first figure, inside the plotting style's context,
    and turns interactive mode on; restoring the settings must not turn it off again
    (every later figure was silently not shown)."""
    monkeypatch.delenv("MPLBACKEND", raising=False)  # a user's kernel: the inline backend
    setup = (
        "import torch, sharpscope as ss\n"
        "torch.manual_seed(0)\n"
        "data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))\n"
        "r = ss.landscape(torch.nn.Linear(3, 2), data, 1, grid=5)"
    )
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(code) for code in (setup, "r.plot();", "r.plot();")]
    done = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    shown = [sum("image/png" in o.get("data", {}) for o in cell.outputs) for cell in done.cells]
    assert shown == [0, 1, 1]
