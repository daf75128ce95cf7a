"""The book's figure style, in one place: white background (readable in dark mode), fixed sizes, PNG output."""

from __future__ import annotations

from typing import Any, Tuple

__all__ = ["use_book_style", "new_figure", "BOOK_STYLE", "COLORS"]

#: Colours used for the methods throughout the book (colour-blind-safe Okabe-Ito palette).
COLORS = {
    "relative": "#0072B2",
    "authors": "#E69F00",
    "ordinary": "#009E73",
    "autodiff": "#CC79A7",
    "plain": "#555555",
    "lu": "#D55E00",
    "data": "#999999",
}

BOOK_STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
    "legend.frameon": False,
    "image.cmap": "viridis",
}


def use_book_style() -> None:
    """Apply :data:`BOOK_STYLE` to matplotlib and make notebooks emit PNG figures.

    Call it once in a chapter's setup cell; it is idempotent.
    """
    import matplotlib as mpl

    mpl.rcParams.update(BOOK_STYLE)
    try:  # inside IPython: PNG, not SVG, so figures are light and identical on every machine
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except Exception:  # pragma: no cover - outside IPython there is nothing to set
        pass


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.4, height: float = 4.0, **kwargs: Any) -> Tuple[Any, Any]:
    """``plt.subplots`` with the book's style and a fixed size in inches (``width`` × ``height``)."""
    import matplotlib.pyplot as plt

    use_book_style()
    return plt.subplots(nrows, ncols, figsize=(width, height), constrained_layout=True, **kwargs)
