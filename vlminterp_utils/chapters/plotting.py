"""Figures the chapters share: scenes with their visual tokens' patches, token sequences, image grids.

Figures over an image take `regions = adapter.token_regions(image.size)`: the box each visual token shows, so the
same code draws a square grid, a centre-cropped one, or LLaVA-NeXT's base grid (`shown=adapter.display_tokens(...)`).
"""
from __future__ import annotations

import itertools
import warnings

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

# A lens may read a visual token as a word in another script (e.g. CJK). The figure shows it as a box; the warning
# matplotlib prints for each missing glyph would only clutter the chapter's page.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")

FIGURES = "figures"  # where `show` saves figures for slides, next to the notebook (and the chapter's web page)


def save_figure(fig, name: str, folder=FIGURES, formats=("png", "svg"), dpi: int = 200) -> list:
    """Save a figure for slides, once per format (PNG at `dpi`, SVG as vectors); each file written atomically."""
    from pathlib import Path

    from ..core.storage import atomic_path
    paths = []
    for fmt in formats:
        path = Path(folder) / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


def show(fig=None, name: str | None = None, folder=FIGURES):
    """Show a figure; with `name`, also save it as PNG and SVG (`save_figure`) and link both under it."""
    from IPython.display import HTML, display
    fig = fig or plt.gcf()
    saved = save_figure(fig, name, folder) if name else []
    plt.show()
    if saved:
        links = " · ".join(f'<a href="{p.as_posix()}">{p.suffix[1:].upper()}</a>' for p in saved)
        display(HTML(f'<p class="figure-export">for slides: {links}</p>'))


def _shown(regions: np.ndarray, shown) -> np.ndarray:
    """Indices of the tokens to draw: those in `shown` (bool mask) that show a patch."""
    valid = ~np.isnan(regions).any(1)
    return np.flatnonzero(valid if shown is None else valid & np.asarray(shown, bool))


def show_patch_grid(image, regions: np.ndarray, selected: np.ndarray | None = None, ax=None,
                    title: str | None = None, color: str = "black", shown=None):
    """The image with the patch of every visual token outlined (`regions`: `adapter.token_regions(image.size)`);
    tokens where `selected` is True are outlined in `color`. `shown` picks the tokens to draw (one grid)."""
    ax = ax or plt.subplots(figsize=(3.2, 3.2))[1]
    w, h = image.size
    ax.imshow(image, extent=(0, w, h, 0))
    for i in _shown(regions, shown):
        x0, y0, x1, y1 = regions[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=0.5, alpha=0.8))
    if selected is not None:
        for i in _shown(regions, selected):
            x0, y0, x1, y1 = regions[i]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
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


def lens_chance_panels(shares, kinds=("object", "background"), size: tuple[float, float] = (3.0, 2.4)):
    """Each lens's share per layer beside its chance controls: a row per patch kind, a column per lens, the lens
    solid and each control in its own dash (the `reading` column), all with their 95% bands."""
    lens_names, readings = list(dict.fromkeys(shares.lens)), list(dict.fromkeys(shares.reading))
    dashes = dict(zip(readings, ["-", "--", ":", "-."]))
    fig, axes = plt.subplots(len(kinds), len(lens_names), figsize=(size[0] * len(lens_names), size[1] * len(kinds)),
                             sharex=True, sharey=True, squeeze=False)
    for (i, kind), (j, lens) in itertools.product(enumerate(kinds), enumerate(lens_names)):
        ax = axes[i, j]
        for reading in readings:
            part = shares[(shares.kind == kind) & (shares.lens == lens) & (shares.reading == reading)]
            part = part.sort_values("layer")
            ax.plot(part.layer, part.share, ls=dashes[reading], color=f"C{j}", label=reading)
            ax.fill_between(part.layer, part.ci_low, part.ci_high, color=f"C{j}", alpha=0.12)
        ax.grid(alpha=0.3)
        ax.set_title(f"{lens}\n{kind} patches", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("share interpreted")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def above_chance_panels(above, kinds=("object", "background"), title: str | None = None):
    """Each lens's share minus its strongest control, per layer, one panel per patch kind, with 95% bands."""
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        lines_with_ci(above[above.kind == kind], x="layer", y="above", hue="lens", ax=ax,
                      title=f"{kind} patches", ylabel="share above chance")
        ax.axhline(0, color="black", lw=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def model_lens_panels(above, kind: str = "object", size: tuple[float, float] = (3.2, 2.6)):
    """Models side by side, a column per lens, on `kind` patches: top, each model's share (solid) and its strongest
    chance control (dashed, same colour); bottom, the share above chance with its 95% band."""
    lens_names, model_names = list(dict.fromkeys(above.lens)), list(dict.fromkeys(above.model))
    fig, axes = plt.subplots(2, len(lens_names), figsize=(size[0] * len(lens_names), size[1] * 2), sharex=True,
                             sharey="row", squeeze=False)
    for j, lens in enumerate(lens_names):
        for m, model in enumerate(model_names):
            part = above[(above.lens == lens) & (above.model == model) & (above.kind == kind)].sort_values("layer")
            axes[0, j].plot(part.layer, part.share, color=f"C{m}", label=model)
            axes[0, j].plot(part.layer, part.chance, color=f"C{m}", ls="--", lw=1, label=f"{model}: chance")
            axes[1, j].plot(part.layer, part.above, color=f"C{m}", label=model)
            axes[1, j].fill_between(part.layer, part.ci_low, part.ci_high, color=f"C{m}", alpha=0.15)
        axes[0, j].set_title(f"{lens}\n{kind} patches", fontsize=9)
        axes[1, j].axhline(0, color="black", lw=0.8)
        axes[1, j].set_xlabel("layer")
    axes[0, 0].set_ylabel("share read right")
    axes[1, 0].set_ylabel("above chance")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def confusion_panels(matrices: dict, size: float = 3.6):
    """Confusion matrices side by side (a dict: title -> `inversion.confusion` table), the share of each row's
    images the judge gave each name, on one colour scale from 0 to 1; rows without images stay blank."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * 1.3 * len(matrices), size), squeeze=False,
                             layout="constrained")
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        if matrix.index[0] not in matrix.columns:  # a first row that is no concept (e.g. the starting images)
            ax.axhline(0.5, color="white", lw=2)
        for i, name in enumerate(matrix.index):  # outline each row's right answer
            if name in matrix.columns:
                j = list(matrix.columns).index(name)
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1))
        ticks = range(len(matrix.columns))
        ax.set_xticks(ticks, matrix.columns, rotation=90, fontsize=6)
        ax.set_yticks(range(len(matrix.index)), matrix.index, fontsize=6)
        ax.set_xlabel("the judge says", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("the image shows (or aims at)", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the row's images")
    return fig


def dose_panel(doses, margin: float, title: str | None = None, ax=None):
    """A paired difference per dose (chapter 4: each LoRA rank against the frozen-LLM twin), one colour per lens,
    with its 95% interval as an error bar, the equivalence margin as a grey band and zero as a line. The ranks sit
    on a log-2 axis, a little apart per lens so that the bars do not hide each other."""
    ax = ax or plt.subplots(figsize=(6, 3.4))[1]
    lens_names = list(dict.fromkeys(doses.lens))
    for j, lens in enumerate(lens_names):
        part = doses[doses.lens == lens].sort_values("rank")
        xs = part["rank"].to_numpy(float) * 2 ** ((j - (len(lens_names) - 1) / 2) * 0.12)
        err = np.stack([part.difference - part.ci_low, part.ci_high - part.difference])
        ax.errorbar(xs, part.difference, yerr=err, marker="o", capsize=3, color=f"C{j}", label=lens)
    ax.axhspan(-margin, margin, color="grey", alpha=0.15, label=f"margin ±{margin:.0%}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ranks = sorted(set(doses["rank"].dropna().astype(int)))
    ax.set_xticks(ranks, [str(r) for r in ranks])
    if ranks:
        ax.set_xlim(min(ranks) / 1.6, max(ranks) * 1.6)  # room for the lenses' offsets, even at one rank
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("difference in share read right")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def bars_with_ci(df, group: str, bar: str, y: str = "flip_rate", ax=None, title: str | None = None,
                 legend: bool = True, twin_suffix: str = "_outside"):
    """Grouped bars (`bar` within `group`) with error bars from the `ci_low` / `ci_high` columns.

    A bar named `<name><twin_suffix>` (chapter 1: a control drawn outside the object, `localization.OUTSIDE`) takes
    `<name>`'s colour, hatched, so that each control stands next to its twin in the same hue."""
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    groups, bars = list(dict.fromkeys(df[group])), list(dict.fromkeys(df[bar]))
    width = 0.8 / len(bars)
    colours = {}
    for j, b in enumerate(bars):
        part = df[df[bar] == b].set_index(group).reindex(groups)
        xs = np.arange(len(groups)) + (j - (len(bars) - 1) / 2) * width
        err = np.stack([part[y] - part["ci_low"], part["ci_high"] - part[y]])
        twin = str(b).removesuffix(twin_suffix)
        style = dict(color=colours[twin], hatch="///", edgecolor="white") if twin != str(b) and twin in colours \
            else {}
        drawn = ax.bar(xs, part[y], width, yerr=np.nan_to_num(err), capsize=2, label=str(b), **style)
        colours.setdefault(str(b), drawn.patches[0].get_facecolor() if drawn.patches else None)
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups])
    ax.set_xlabel(group.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def patch_heatmaps(image, maps: np.ndarray, titles: list[str], regions: np.ndarray, vmax: float | None = None,
                   cmap: str = "magma", shown=None, ncols: int = 4):
    """Per-token values (n_maps, n_visual) drawn over each token's patch of the image, one panel each, in rows of
    at most `ncols` panels (the image first), so that the panels stay readable at the book's page width."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize

    n = len(maps) + 1
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.7 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    w, h = image.size
    idx = _shown(regions, shown)
    vmax = vmax if vmax is not None else float(np.max(np.asarray(maps)[:, idx]))
    norm = Normalize(0, vmax if vmax > 0 else 1)
    for ax, m, t in zip(axes[1:], maps, titles):
        ax.imshow(image, extent=(0, w, h, 0))
        boxes = [Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in regions[idx]]
        cells = PatchCollection(boxes, cmap=cmap, norm=norm, alpha=0.75, linewidth=0)
        cells.set_array(np.asarray(m)[idx])
        ax.add_collection(cells)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(t, fontsize=9)
    for ax in axes[:n]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(cells, ax=list(axes[:n]), fraction=0.03)
    return fig


def _word_grid(ax, image, words, regions, shown=None):
    w, h = image.size
    ax.imshow(image, extent=(0, w, h, 0), alpha=0.45)
    for i in _shown(regions, shown):
        x0, y0, x1, y1 = regions[i]
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, words[i], ha="center", va="center", fontsize=6)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def viewer_page(image, words: dict[str, list[list[str]]], regions: np.ndarray, title: str = "logit lens",
                shown=None) -> str:
    """A self-contained HTML page (no server, no Python): the image, a layer slider, a lens menu when there are
    several lenses, and each patch's top word. `words[lens][layer][token]`."""
    import base64
    import html
    import io
    import json

    side = 512
    buf = io.BytesIO()
    image.resize((side, side), 0).save(buf, format="PNG")
    w, h = image.size
    idx = _shown(regions, shown)
    boxes = [[round(v, 1) for v in (x0 * side / w, y0 * side / h, (x1 - x0) * side / w, (y1 - y0) * side / h)]
             for x0, y0, x1, y1 in regions[idx]]
    data = {name: [[layer[i] for i in idx] for layer in per_layer] for name, per_layer in words.items()}
    names = list(data)
    menu = "".join(f"<option>{html.escape(n)}</option>" for n in names)
    hidden = "" if len(names) > 1 else " hidden"
    last = len(data[names[0]]) - 1
    # JSON inside <script>: "</" must not close the script element early.
    words_json = json.dumps(data).replace("</", "<\\/")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:8px}} #g{{position:relative;width:{side}px;height:{side}px;
background:url(data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()});}}
#g div{{position:absolute;display:flex;align-items:center;overflow:hidden;
justify-content:center;font-size:11px;background:rgba(255,255,255,.45);outline:1px solid rgba(0,0,0,.15)}}
</style></head><body><h3>{html.escape(title)}</h3>
<select id="n"{hidden}>{menu}</select>
<label>layer <input id="s" type="range" min="0" max="{last}" value="0"> <span id="l">0</span>
</label><div id="g"></div><script>
const D={words_json}, B={json.dumps(boxes)}, g=document.getElementById('g'),
  s=document.getElementById('s'), n=document.getElementById('n');
function draw(){{const k=+s.value, W=D[n.value][k]; g.innerHTML='';
W.forEach((w,p)=>{{const d=document.createElement('div'),b=B[p];
d.style.left=b[0]+'px';d.style.top=b[1]+'px';d.style.width=b[2]+'px';d.style.height=b[3]+'px';
d.textContent=w;d.title=w;g.appendChild(d);}});document.getElementById('l').textContent=k;}}
s.oninput=draw; n.onchange=()=>{{s.max=D[n.value].length-1; draw();}}; draw();
</script></body></html>"""


def _as_lenses(words, title: str) -> dict[str, list[list[str]]]:
    return words if isinstance(words, dict) else {title: words}


def lens_html(image, words, regions: np.ndarray, path, title: str = "logit lens", shown=None):
    """Write the standalone viewer (`viewer_page`) to `path`; `words` per layer, or a dict of them per lens."""
    from ..core.storage import write_text
    return write_text(path, viewer_page(image, _as_lenses(words, title), regions, title, shown))


def lens_viewer(image, words, regions: np.ndarray, title: str = "logit lens", shown=None, height: int = 620):
    """The same viewer inline in the notebook's output: it runs in the browser, so it works in the static web
    book (no kernel), in Colab and in Jupyter. (An ipywidgets slider would need a live kernel.)"""
    import html

    from IPython.display import HTML
    page = viewer_page(image, _as_lenses(words, title), regions, title, shown)
    # In a <div>: IPython warns about HTML that starts with an iframe, though srcdoc is what makes this one work.
    return HTML(f'<div><iframe class="lens-viewer" srcdoc="{html.escape(page, quote=True)}" '
                f'style="width:100%;max-width:560px;height:{height}px;border:0"></iframe></div>')


def word_grids(image, words_by_name: dict[str, list[str]], regions: np.ndarray, suptitle: str | None = None,
               shown=None):
    """Side by side, each patch's top word under several lenses; returns the figure."""
    fig, axes = plt.subplots(1, len(words_by_name), figsize=(5 * len(words_by_name), 5))
    for ax, (name, words) in zip(np.atleast_1d(axes), words_by_name.items()):
        _word_grid(ax, image, words, regions, shown)
        ax.set_title(name, fontsize=10)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return fig


def matched_layer_heatmap(counts, ax=None, title: str | None = None, tokens: str = "visual token"):
    """Rows: the layer a token (a visual one by default) is read at; columns: the contextual layer its best match
    comes from."""
    table = counts.pivot_table(index="query_layer", columns="contextual_layer", values="count", fill_value=0)
    share = table.div(table.sum(1), axis=0)
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    shown = ax.imshow(share.values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(share.shape[1]), share.columns)
    ax.set_yticks(range(0, share.shape[0], max(1, share.shape[0] // 10)),
                  share.index[::max(1, share.shape[0] // 10)])
    ax.set_xlabel("contextual layer of the best match")
    ax.set_ylabel(f"layer the {tokens} is read at")
    plt.colorbar(shown, ax=ax, label=f"share of {tokens}s")
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
