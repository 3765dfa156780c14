"""One paper theme for every sharpscope figure.

* A seaborn ``ticks`` theme with small serif-free fonts sized for print (8 pt labels).
* The Okabe–Ito palette (Okabe & Ito 2008, "Color Universal Design"), distinguishable
  under the common colour-vision deficiencies; each optimizer keeps its colour in
  every figure (:func:`optimizer_color`).
* Sizes for one column (3.35 in, the ICML/NeurIPS column width) and two columns
  (6.9 in): :func:`figure_size`.
* :func:`save_figure` writes a vector PDF and a 200-dpi PNG, and the data behind the
  figure beside them (CSV for tables, JSON otherwise), so every number in a figure can
  be checked without rerunning anything.

Plotting functions take results and return a Figure; they never touch a model.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..results import atomic_write_bytes, rows_to_csv_bytes, write_json

#: Okabe–Ito colour-blind-safe palette (black last, used for references).
PALETTE = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
OPTIMIZER_COLORS = {
    "sgd": PALETTE[7],
    "adam": "#666666",
    "adamw": "#666666",
    "sam": PALETTE[0],
    "asam": PALETTE[1],
    "vasso": PALETTE[2],
    "lets": PALETTE[3],
    "samon": PALETTE[4],
    "bsam": PALETTE[5],
}
OPTIMIZER_LABELS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "sam": "SAM",
    "asam": "ASAM",
    "vasso": "VaSSO",
    "lets": "LETS",
    "samon": "SAM-ON",
    "bsam": "bSAM",
}
_NAME_OF_LABEL = {label.lower(): name for name, label in OPTIMIZER_LABELS.items()}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "--", ":", "-.")
COLUMN_WIDTH = 3.35  # inches, one column of a two-column paper
TEXT_WIDTH = 6.9  # inches, both columns
RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # embed TrueType: editable text in the PDF
    "ps.fonttype": 42,
    "figure.dpi": 100,
}


def figure_size(
    columns: int = 1, aspect: float = 0.75, rows: int = 1, ncols: int = 1
) -> tuple[float, float]:
    """(width, height) in inches for a figure spanning one or two columns.

    Args:
        columns: 1 (3.35 in) or 2 (6.9 in).
        aspect: height / width of one panel.
        rows: rows of panels.
        ncols: panels per row (they share the width).

    >>> figure_size(1)
    (3.35, 2.5125)
    >>> figure_size(2, aspect=1.0, rows=2, ncols=3)
    (6.9, 4.6)
    """
    if columns not in (1, 2):
        from ..errors import SharpscopeError

        raise SharpscopeError(f"columns must be 1 or 2, got {columns}")
    width = COLUMN_WIDTH if columns == 1 else TEXT_WIDTH
    return (width, round(width / ncols * aspect * rows, 4))


def apply_style() -> None:
    """Install the sharpscope theme globally (seaborn ticks + :data:`RC` + palette)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="ticks", palette=list(PALETTE), rc=RC)
    mpl.rcParams.update(RC)


@contextmanager
def paper_style() -> Iterator[None]:
    """Use the theme inside a ``with`` block, restoring the previous settings after."""
    import matplotlib as mpl

    with mpl.rc_context():
        try:
            apply_style()
            yield
        finally:
            # a notebook's inline backend, loaded at the block's first figure, turns
            # interactive mode on; rc_context would undo that and hide later figures
            interactive = mpl.is_interactive()
    mpl.interactive(interactive)


def optimizer_color(name: str, index: int = 0) -> str:
    """The colour of an optimizer (the same in every figure); others cycle the palette."""
    key = str(name).lower()
    if key in OPTIMIZER_COLORS:
        return OPTIMIZER_COLORS[key]
    word = key.split(" ")[0]
    for head in (_NAME_OF_LABEL.get(word), word.split("-")[0]):  # "SAM-ON ρ=0.5", "sam-rho0.1"
        if head in OPTIMIZER_COLORS:
            return OPTIMIZER_COLORS[head]
    return PALETTE[index % (len(PALETTE) - 1)]


def optimizer_label(name: str) -> str:
    """Display name: ``"samon"`` -> ``"SAM-ON"``; unknown labels are kept.

    >>> optimizer_label("samon"), optimizer_label("bsam (BMA)"), optimizer_label("mine")
    ('SAM-ON', 'bSAM (BMA)', 'mine')
    """
    text = str(name)
    head, sep, rest = text.partition(" ")
    if head.lower() in OPTIMIZER_LABELS:
        return OPTIMIZER_LABELS[head.lower()] + sep + rest
    return text


def styled(function):
    """Run a plotting function inside :func:`paper_style`: its figure gets the theme, the
    caller's matplotlib settings are left as they were."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with paper_style():
            return function(*args, **kwargs)

    return wrapper


def new_figure(columns: int = 1, aspect: float = 0.75, nrows: int = 1, ncols: int = 1, **kwargs):
    """A themed figure and its axes (``plt.subplots`` with a paper size); call it from a
    :func:`styled` function (or inside :func:`paper_style`) for the theme."""
    import matplotlib.pyplot as plt

    size = figure_size(columns, aspect, rows=nrows, ncols=ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, constrained_layout=True, **kwargs)
    return fig, axes


@styled
def figure_legend(fig: Any, axes: Any, max_columns: int = 7) -> None:
    """One legend for all panels, above them (outside every axes, so it hides no data).

    Entries are collected from every panel in order, each label once.
    """
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    columns = min(len(entries), max_columns)
    while columns:
        legend = fig.legend(
            list(entries.values()), list(entries), loc="outside upper center", ncol=columns
        )
        # long labels: fewer columns rather than a legend wider than the figure (which
        # would widen the saved figure beyond its paper column)
        width = legend.get_window_extent(fig.canvas.get_renderer()).width
        if columns == 1 or width <= fig.bbox.width:
            break
        legend.remove()
        columns -= 1


@styled
def add_caption(fig: Any, text: str) -> None:
    """A small grey line under the figure (saved with it: figures are saved with a tight box)."""
    if text:
        fig.text(0.5, 0.0, text, ha="center", va="top", fontsize="x-small", color="0.35", wrap=True)


#: characters per line of a 6-pt title over a one-column figure
TITLE_CHARACTERS = 56


def wrap_parts(parts: list[str], width: int = TITLE_CHARACTERS) -> str:
    """Join ``parts`` with "; " into lines of at most ``width`` characters (a part longer
    than a line is broken): a long title would widen a one-column figure.

    >>> print(wrap_parts(["random", "norm=filter", "mnist1d n=512"], width=20))
    random; norm=filter
    mnist1d n=512
    """
    import textwrap

    lines, line = [], ""
    for part in parts:
        for piece in textwrap.wrap(part, width) or [""]:
            if line and len(line) + 2 + len(piece) > width:
                lines.append(line)
                line = piece
            else:
                line = f"{line}; {piece}" if line else piece
    lines.append(line)
    return "\n".join(lines)


#: the two files every figure is written as
FIGURE_SUFFIXES = (".pdf", ".png")


def figure_base(path: str | Path) -> Path:
    """``PATH`` without a ``.pdf``/``.png`` suffix; any other dot stays part of the name.

    >>> figure_base("figs/sam_rho0.05.pdf"), figure_base("figs/sam_rho0.05")
    (PosixPath('figs/sam_rho0.05'), PosixPath('figs/sam_rho0.05'))
    """
    base = Path(path)
    return base.with_suffix("") if base.suffix in FIGURE_SUFFIXES else base


def beside(base: Path, suffix: str) -> Path:
    """``base`` + ``suffix`` (not :meth:`Path.with_suffix`, which would turn
    ``sam_rho0.05`` into ``sam_rho0.pdf`` and let ``sam_rho0.1`` overwrite it).

    >>> beside(Path("figs/sam_rho0.05"), ".pdf")
    PosixPath('figs/sam_rho0.05.pdf')
    """
    return base.with_name(base.name + suffix)


@styled
def save_figure(fig: Any, path_without_suffix: str | Path, data: Any = None) -> list[Path]:
    """Write ``PATH.pdf`` (vector) and ``PATH.png`` (200 dpi), and the data beside them.

    Args:
        fig: a matplotlib Figure.
        path_without_suffix: e.g. ``figures/spectra`` -> ``figures/spectra.pdf`` ...; a
            ``.pdf`` or ``.png`` ending is dropped, other dots are kept
            (``sam_rho0.05`` -> ``sam_rho0.05.pdf``).
        data: what the figure shows: a list of row dicts goes to ``PATH.csv``, anything
            else JSON-able (dicts, arrays, results) to ``PATH.json``. ``None``: nothing.

    Returns:
        The files written.
    """
    base = figure_base(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, kwargs in zip(FIGURE_SUFFIXES, ({}, {"dpi": 200})):
        buffer = io.BytesIO()
        # a fixed creation date keeps committed PDFs byte-stable across regenerations
        metadata = {"CreationDate": None} if suffix == ".pdf" else {"Software": None}
        fig.savefig(buffer, format=suffix[1:], metadata=metadata, **kwargs)
        atomic_write_bytes(beside(base, suffix), buffer.getvalue())
        written.append(beside(base, suffix))
    if data is not None:
        if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
            atomic_write_bytes(beside(base, ".csv"), rows_to_csv_bytes(data))
            written.append(beside(base, ".csv"))
        else:
            payload = data.to_dict() if hasattr(data, "to_dict") else data
            write_json(beside(base, ".json"), payload, indent=1)
            written.append(beside(base, ".json"))
    return written
