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


def lines_with_ci(df, x: str, y: str, hue: str, ax=None, title: str | None = None, ylabel: str | None = None):
    """One line per `hue` value over `x`, with a shaded band between the `ci_low` and `ci_high` columns."""
    ax = ax or plt.subplots(figsize=(7, 3.6))[1]
    for name, part in df.groupby(hue, sort=False):
        part = part.sort_values(x)
        ax.plot(part[x], part[y], marker="o", ms=3, label=str(name))
        if {"ci_low", "ci_high"} <= set(part.columns):
            ax.fill_between(part[x], part["ci_low"], part["ci_high"], alpha=0.2)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel or y.replace("_", " "))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def bars_with_ci(df, group: str, bar: str, y: str = "flip_rate", ax=None, title: str | None = None):
    """Grouped bars (`bar` within `group`) with error bars from the `ci_low` / `ci_high` columns."""
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    groups, bars = list(dict.fromkeys(df[group])), list(dict.fromkeys(df[bar]))
    width = 0.8 / len(bars)
    for j, b in enumerate(bars):
        part = df[df[bar] == b].set_index(group).reindex(groups)
        xs = np.arange(len(groups)) + (j - (len(bars) - 1) / 2) * width
        err = np.stack([part[y] - part["ci_low"], part["ci_high"] - part[y]])
        ax.bar(xs, part[y], width, yerr=np.nan_to_num(err), capsize=2, label=str(b))
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups])
    ax.set_xlabel(group.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def patch_heatmaps(image, maps: np.ndarray, titles: list[str], vmax: float | None = None, cmap: str = "magma"):
    """Per-patch values (n_maps, rows, cols) drawn over the image, one panel each; returns the figure."""
    n = len(maps)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.1 * (n + 1), 2.4))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    w, h = image.size
    vmax = vmax if vmax is not None else float(np.max(maps))
    for ax, m, t in zip(axes[1:], maps, titles):
        ax.imshow(image, extent=(0, w, h, 0))
        shown = ax.imshow(m, extent=(0, w, h, 0), cmap=cmap, alpha=0.75, vmin=0, vmax=vmax)
        ax.set_title(t, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, fraction=0.02)
    return fig


def _word_grid(ax, image, words, grid):
    rows, cols = grid
    w, h = image.size
    ax.imshow(image, extent=(0, w, h, 0), alpha=0.45)
    for p, word in enumerate(words):
        r, c = divmod(p, cols)
        ax.text((c + 0.5) * w / cols, (r + 0.5) * h / rows, word, ha="center", va="center", fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])


def lens_explorer(image, words_per_layer: list[list[str]], grid: tuple[int, int], title: str = "logit lens"):
    """An ipywidgets slider over layers showing each patch's top word on the image."""
    import ipywidgets as widgets

    def show(layer):
        fig, ax = plt.subplots(figsize=(5, 5))
        _word_grid(ax, image, words_per_layer[layer], grid)
        ax.set_title(f"{title}: layer {layer}", fontsize=9)
        plt.show()

    return widgets.interact(show, layer=widgets.IntSlider(0, 0, len(words_per_layer) - 1, 1,
                                                          continuous_update=False))


def lens_html(image, words_per_layer: list[list[str]], grid: tuple[int, int], path, title: str = "logit lens"):
    """A standalone HTML viewer (no server, no Python): the image, a layer slider and each patch's top word."""
    import base64
    import io
    import json

    from ..core.storage import write_text

    buf = io.BytesIO()
    image.resize((512, 512), 0).save(buf, format="PNG")
    rows, cols = grid
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif}} #g{{position:relative;width:512px;height:512px;
background:url(data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()});}}
#g div{{position:absolute;width:{512 / cols}px;height:{512 / rows}px;display:flex;align-items:center;
justify-content:center;font-size:11px;background:rgba(255,255,255,.45);outline:1px solid rgba(0,0,0,.15)}}
</style></head><body><h3>{title}</h3>
<label>layer <input id="s" type="range" min="0" max="{len(words_per_layer) - 1}" value="0"> <span id="l">0</span>
</label><div id="g"></div><script>
const W={json.dumps(words_per_layer)}, R={rows}, C={cols}, g=document.getElementById('g');
function draw(k){{g.innerHTML='';W[k].forEach((w,p)=>{{const d=document.createElement('div');
d.style.left=(p%C)*512/C+'px';d.style.top=Math.floor(p/C)*512/R+'px';d.textContent=w;g.appendChild(d);}});
document.getElementById('l').textContent=k;}}
document.getElementById('s').oninput=e=>draw(+e.target.value);draw(0);
</script></body></html>"""
    return write_text(path, page)


def word_grids(image, words_by_name: dict[str, list[str]], grid: tuple[int, int], suptitle: str | None = None):
    """Side by side, each patch's top word under several lenses; returns the figure."""
    fig, axes = plt.subplots(1, len(words_by_name), figsize=(5 * len(words_by_name), 5))
    for ax, (name, words) in zip(np.atleast_1d(axes), words_by_name.items()):
        _word_grid(ax, image, words, grid)
        ax.set_title(name, fontsize=10)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return fig


def matched_layer_heatmap(counts, ax=None, title: str | None = None):
    """Rows: the layer a visual token is read at; columns: the contextual layer its best match comes from."""
    table = counts.pivot_table(index="query_layer", columns="contextual_layer", values="count", fill_value=0)
    share = table.div(table.sum(1), axis=0)
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    shown = ax.imshow(share.values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(share.shape[1]), share.columns)
    ax.set_yticks(range(0, share.shape[0], max(1, share.shape[0] // 10)),
                  share.index[::max(1, share.shape[0] // 10)])
    ax.set_xlabel("contextual layer of the best match")
    ax.set_ylabel("layer the visual token is read at")
    plt.colorbar(shown, ax=ax, label="share of visual tokens")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def loss_curves(history, ax=None, title: str | None = None):
    """Every weighted loss term of an inversion over the steps, on a log scale."""
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    for column in history.columns:
        if column not in ("step", "lr"):
            ax.plot(history["step"], history[column].clip(lower=1e-8), label=column,
                    lw=2.2 if column == "total" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.legend(fontsize=8, ncol=4)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
