"""Figures on disk: matplotlib with a file backend, when it is installed (``pip install 'regtok[plot]'``).

``curves.png`` (train) and ``prefix.png`` (eval) are drawn through :func:`pyplot` and saved at :data:`DPI`;
without matplotlib :func:`pyplot` is None and the figure is skipped.
"""

from __future__ import annotations

from typing import Any

DPI = 100


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
