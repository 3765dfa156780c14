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


def test_m_sharpness_notebook_draws_s_m_on_the_log_axis_its_text_reads_it_on(tmp_path):
    """Session 27: the text said the SAM and SGD curves "are parallel on a log scale, not on
    this linear one" of its own figure; the figure cell now draws S_m on a log y axis."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sharpscope.plotting import paper_style, save_figure
    from sharpscope.plotting.style import optimizer_color

    path = Path(__file__).parents[1] / "analysis_notebooks" / "m_sharpness.ipynb"
    cells = json.loads(path.read_text())["cells"]
    (index,) = [i for i, c in enumerate(cells) if 'work / "m_sharpness"' in "".join(c["source"])]
    assert "on this log scale the two curves are\nparallel" in "".join(cells[index - 1]["source"])
    curves = {"sgd": [0.35, 0.2, 0.1, 0.05, 0.03], "sam": [0.21, 0.12, 0.06, 0.03, 0.018]}
    names = {"plt": plt, "paper_style": paper_style, "save_figure": save_figure,
             "optimizer_color": optimizer_color, "curves": curves, "ms": [1, 4, 16, 64, 256],
             "work": tmp_path}  # fmt: skip
    exec("".join(cells[index]["source"]), names)
    ax = names["fig"].axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert [list(line.get_ydata()) for line in ax.lines] == list(curves.values())
    plt.close(names["fig"])
