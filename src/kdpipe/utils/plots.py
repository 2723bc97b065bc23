"""The finish every accuracy plot shares: axes in percent, legend outside, saved atomically."""

from __future__ import annotations

from pathlib import Path

from kdpipe.utils.io import atomic_file


def save_accuracy_plot(fig, ax, path: Path, ylabel: str, title: str) -> None:
    """Label the y axis (0-105 %), add the title, a legend right of the axes and a light grid, then write
    ``path`` atomically and close the figure."""
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    finish_plot(fig, ax, path, title, grid_axis="y")


def finish_plot(fig, ax, path: Path, title: str, grid_axis: str = "y") -> None:
    """Add the title, a legend right of the axes and a light grid, then write ``path`` atomically and close
    the figure."""
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    import matplotlib.pyplot as plt  # the caller chose the backend (Agg) before pyplot was first imported

    plt.close(fig)
