"""The marks every statprune plot shares (matplotlib): the dense model's level, the quality bar
and the selected model, drawn alike in ``sweep``'s plots and ``report``'s figures."""

from __future__ import annotations

from typing import Any

BAR_STYLE = {"color": "tab:red", "linestyle": ":", "linewidth": 1.2}
SELECTED_STYLE = {"marker": "*", "markersize": 16, "color": "gold", "markeredgecolor": "black"}


DENSE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}


def dense_line(ax: Any, value: float, label: str) -> None:
    """The dense model's quality: a dashed horizontal line at ``value``."""
    ax.axhline(value, label=label, **DENSE_STYLE)


def quality_bar(ax: Any, threshold: float, label: str) -> None:
    """The bar the candidates must meet: a dotted horizontal line at ``threshold``."""
    ax.axhline(threshold, label=label, **BAR_STYLE)


def selected_point(ax: Any, x: float, y: float, label: str | None = None) -> None:
    """The selected (recommended) model: a gold star at (``x``, ``y``)."""
    ax.plot([x], [y], linestyle="none", label=label, **SELECTED_STYLE)
