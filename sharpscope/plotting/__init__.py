"""Figures from results: each function takes a result and returns a matplotlib Figure.

Plotting never touches a model; analyses never plot. Every figure is saved as PDF and
PNG (see :func:`sharpscope.plotting.style.save_figure`).
"""
