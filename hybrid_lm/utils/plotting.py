"""matplotlib without a display, and PNGs written atomically: the one place the training monitor and the
evaluation plots get both from."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: matplotlib is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write the PNG beside its final name and rename it into place, so a reader never sees half a file."""
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    pyplot().close(fig)
    tmp.replace(path)
