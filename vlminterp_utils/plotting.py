"""Figures the chapters share: scenes with their patch grid, token sequences, image grids."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle


def show_patch_grid(image, grid: tuple[int, int], cells: np.ndarray | None = None, ax=None,
                    title: str | None = None, color: str = "black"):
    """The image with its visual-token grid drawn on it; `cells` (rows, cols bool) are outlined."""
    ax = ax or plt.subplots(figsize=(3.2, 3.2))[1]
    w, h = image.size
    rows, cols = grid
    ax.imshow(image, extent=(0, w, h, 0))
    for r in range(1, rows):
        ax.axhline(r * h / rows, color="white", lw=0.6, alpha=0.8)
    for c in range(1, cols):
        ax.axvline(c * w / cols, color="white", lw=0.6, alpha=0.8)
    if cells is not None:
        for r, c in zip(*np.nonzero(cells)):
            ax.add_patch(Rectangle((c * w / cols, r * h / rows), w / cols, h / rows, fill=False, ec=color, lw=1.5))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def show_token_strip(tokens: list[str], visual: np.ndarray, ax=None, title: str | None = None):
    """A sequence as a strip of coloured boxes: visual tokens in one colour, text tokens labelled."""
    ax = ax or plt.subplots(figsize=(12, 1.4))[1]
    for i, (tok, is_visual) in enumerate(zip(tokens, visual)):
        ax.add_patch(Rectangle((i, 0), 1, 1, color="tab:orange" if is_visual else "tab:blue", alpha=0.85, ec="white"))
        if not is_visual:
            ax.text(i + 0.5, 1.1, tok.replace("\n", "\\n"), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, len(tokens))
    ax.set_ylim(0, 4)
    ax.set_yticks([])
    ax.set_xlabel("sequence position")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def image_grid(images, titles=None, ncols: int = 6, size: float = 2.0):
    """Images in a grid with optional titles; returns the figure."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, im in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(im)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
