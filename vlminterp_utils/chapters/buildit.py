"""Build-it exercises: the reader writes a mechanism, and a check runs it beside the book's own on live inputs.

An exercise is one entry of `EXERCISES`: its chapter, its tags (difficulty and importance from 1 to 3, the
minutes to spend) and its solution, which is the book's own function (shown folded on the page, so the two
cannot drift). Its check, `check_<name>(fn, ...)`, takes the reader's function and the page's live objects,
builds its cases from them (several items, padding, an empty selection, another layer), runs the reader's
function and the book's on copies of each case's inputs, and prints the first difference in words a student can
act on (which case, shape, item, position, the size of the error), or "Correct". While the reader's function is
still the stub (it raises NotImplementedError) the check says so and returns None, so a chapter executed
unattended (papermill, CI) runs through; otherwise it returns True or False.
"""
from __future__ import annotations

import copy
import re
import textwrap
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..core import embedded, geometry, readout
from ..core.neighbours import exact_search
from . import interventions, inversion, latentlens, lenses


@dataclass(frozen=True)
class Exercise:
    name: str  # the function the reader writes
    chapter: int
    number: int  # within the chapter
    title: str
    difficulty: int  # 1 (a few lines) .. 3 (several conventions to get right)
    importance: int  # 1 (nice to know) .. 3 (the chapter's mechanism)
    minutes: int  # to spend on it in class or at home
    solution: Callable

    @property
    def label(self) -> str:
        return f"Build it {self.chapter}.{self.number}"


EXERCISES = {e.name: e for e in [
    Exercise("image_token_positions", 0, 1, "Where the visual tokens sit", 1, 3, 10, readout.image_token_positions),
    Exercise("patch_boxes", 0, 2, "The image box each visual token shows", 1, 2, 10, geometry.patch_boxes),
    Exercise("merge_visual_tokens", 0, 3, "The sequence the LLM receives", 2, 3, 15, readout.merge_visual_tokens),
    Exercise("block_matrix", 1, 1, "Which attention edges to cut", 1, 2, 10, interventions.block_matrix),
    Exercise("knockout_mask", 1, 2, "The attention mask of a knockout", 3, 3, 25, interventions.knockout_mask),
    Exercise("mean_ablated_logits", 1, 3, "A mean-ablation hook", 2, 3, 20, interventions.mean_ablated_logits),
    Exercise("logit_lens", 2, 1, "The logit lens at one layer", 1, 3, 10, lenses.logit_lens),
    Exercise("exact_search", 2, 2, "Nearest neighbours in the index", 2, 2, 15, exact_search),
    Exercise("merge_official", 2, 3, "The cross-layer merge", 2, 2, 15, latentlens.merge_official),
    Exercise("tv_l2", 3, 1, "The smoothness prior", 1, 2, 10, inversion.tv_l2),
    Exercise("patch_boundary_loss", 3, 2, "The patch prior", 2, 2, 15, inversion.patch_boundary_loss),
    Exercise("inversion_step", 3, 3, "One step of MIMIC", 2, 3, 20, inversion.inversion_step),
    Exercise("lora_delta", 4, 1, "A LoRA update from its factors", 1, 3, 10, embedded.lora_delta),
    Exercise("merge_updates", 4, 2, "Merging updates into the weights", 2, 2, 15, embedded.merge_updates),
]}


def chapter_exercises(chapter: int) -> list[Exercise]:
    return sorted((e for e in EXERCISES.values() if e.chapter == chapter), key=lambda e: e.number)


def chapter_minutes(chapter: int) -> int:
    """The minutes the chapter's build-it exercises ask for, added up from their tags."""
    return sum(e.minutes for e in chapter_exercises(chapter))


def tags(name: str) -> str:
    """'difficulty ●●○ · importance ●●● · 15 min' for an exercise."""
    e = EXERCISES[name]
    dots = lambda n: "●" * n + "○" * (3 - n)  # noqa: E731
    return f"difficulty {dots(e.difficulty)} · importance {dots(e.importance)} · {e.minutes} min"


def card(name: str):
    """Display an exercise's heading with its tags (a chapter's exercise cell)."""
    from IPython.display import Markdown, display
    e = EXERCISES[name]
    display(Markdown(f"**{e.label}: {e.title}** ({tags(name)})"))


def solution_functions(name: str) -> list[Callable]:
    """The book's functions that make the solution of exercise `name`: its own, then the helpers it calls."""
    helpers = {"tv_l2": [inversion.neighbour_differences],
               "mean_ablated_logits": [interventions.replace_visual_tokens, readout.edit_visual_inputs],
               "merge_visual_tokens": [readout.image_token_positions]}
    return [EXERCISES[name].solution, *helpers.get(name, [])]


def solution(name: str):
    """Display the book's own functions that solve exercise `name` (a folded cell of the chapter)."""
    from . import report
    for fn in solution_functions(name):
        report.show_source(fn)


# ---------------------------------------------------------------------------------------------- comparing


@dataclass
class Case:
    """One call of both functions: what it tests (for the message), its arguments, and how to read the output."""

    what: str
    args: tuple
    axes: tuple[str, ...] = ()  # names of the output's dimensions, e.g. ("item", "position")
    tolerance: float = 1e-5  # relative to the largest finite value of the book's output
    run: Callable | None = None  # run(fn, args) -> output, when a call is more than fn(*args)
    after: Callable | None = None  # after(args) -> a message when the reader's call left something behind
    names: tuple[str, ...] = field(default=())  # names of the arguments, for "changed its argument" messages


def fresh(x):
    """A copy of the tensors and arrays in `x` (nested in tuples, lists and dicts); modules and the rest as is."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad) if x.is_leaf else x.clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, (list, tuple)):
        return type(x)(fresh(v) for v in x)
    if isinstance(x, dict):
        return {k: fresh(v) for k, v in x.items()}
    return x


def _as_array(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    return np.asarray(x)


def _where(index, axes) -> str:
    names = list(axes) + [f"axis {i}" for i in range(len(axes), len(index))]
    return ", ".join(f"{n} {i}" for n, i in zip(names, index))


def first_difference(mine, book, axes=(), tolerance: float = 1e-5, what: str = "your output") -> str | None:
    """The first way `mine` differs from `book`, in words, or None when they agree."""
    if isinstance(book, (tuple, list)):
        if not isinstance(mine, (tuple, list)) or len(mine) != len(book):
            got = f"a {type(mine).__name__}" + (f" of {len(mine)}" if isinstance(mine, (tuple, list)) else "")
            return f"{what} should be a tuple of {len(book)} values; it is {got}."
        for i, (m, b) in enumerate(zip(mine, book)):
            if (message := first_difference(m, b, axes, tolerance, f"{what}[{i}]")) is not None:
                return message
        return None
    if isinstance(book, dict):
        if not isinstance(mine, dict) or set(mine) != set(book):
            keys = sorted(mine) if isinstance(mine, dict) else type(mine).__name__
            return f"{what} should be a dict with keys {sorted(book)}; it is {keys}."
        for key in book:
            if (message := first_difference(mine[key], book[key], axes, tolerance, f"{what}[{key!r}]")) is not None:
                return message
        return None
    if mine is None:
        return f"{what} is None: the function returns nothing. Did you forget `return`?"
    if isinstance(book, (torch.Tensor, np.ndarray)) and not isinstance(mine, (torch.Tensor, np.ndarray)):
        return f"{what} is a {type(mine).__name__}; the book returns a {type(book).__name__}."
    a, b = _as_array(mine), _as_array(book)
    if a.shape != b.shape:
        return f"{what} has shape {tuple(a.shape)} where the book's has shape {tuple(b.shape)}."
    if (b.dtype == bool) != (a.dtype == bool):
        return f"{what} holds {a.dtype} values where the book's holds {b.dtype} (True/False per entry)."
    if b.dtype == bool or np.issubdtype(b.dtype, np.integer):
        wrong = a != b
        largest = None
    else:
        a, b = a.astype(np.float64), b.astype(np.float64)
        finite = b[np.isfinite(b)]
        scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        close = np.isclose(a, b, rtol=tolerance, atol=tolerance * scale) | ((a == b) & ~np.isnan(b))
        wrong = ~close
        with np.errstate(invalid="ignore"):  # inf - inf where both are infinite
            difference = np.abs(a - b)[wrong]
        largest = float(np.nanmax(difference)) if difference.size and not np.isnan(difference).all() else None
    if not wrong.any():
        return None
    index = tuple(int(i) for i in np.argwhere(wrong)[0])
    at = f" at {_where(index, axes)}" if index else ""
    count = f"{int(wrong.sum())} of {wrong.size} values differ"
    size = f", the largest by {largest:.3g}" if largest is not None and np.isfinite(largest) else ""
    return f"{what} differs{at}: yours is {a[index]!r}, the book's {b[index]!r} ({count}{size})."


def _changed_arguments(before, after, names) -> str | None:
    for i, (b, a) in enumerate(zip(before, after)):
        if isinstance(b, (torch.Tensor, np.ndarray)) and first_difference(a, b) is not None:
            name = names[i] if i < len(names) else f"#{i + 1}"
            return (f"your function changed its argument `{name}` in place; work on a copy "
                    "(`.clone()`) and return the result.")
    return None


def say(text: str) -> None:
    """Print a check's verdict wrapped to the book's column (88 characters), so it reads without scrolling."""
    print(textwrap.fill(text, 88, break_long_words=False, break_on_hyphens=False))


def run_cases(name: str, fn: Callable, cases: list[Case]) -> bool | None:
    """Run the reader's `fn` and the book's solution on every case; print the verdict and return it."""
    exercise = EXERCISES[name]
    if not callable(fn):
        say(f"{exercise.label}: pass your function itself, e.g. `{name}`, not {type(fn).__name__}.")
        return False
    for case in cases:
        run = case.run or (lambda f, args: f(*args))
        args = fresh(case.args)
        try:
            mine = run(fn, args)
        except NotImplementedError:
            say(f"`{name}` is still the stub: write its body, run its cell, then this check again.")
            return None
        except Exception as err:  # the reader's code: say where it failed, in their words
            say(f"Not yet ({case.what}): your function raised {type(err).__name__}: {err}")
            return False
        message = (case.after(args) if case.after else None) or _changed_arguments(case.args, args, case.names)
        if message is None:
            book = run(exercise.solution, fresh(case.args))
            message = first_difference(mine, book, case.axes, case.tolerance)
        if message is not None:
            say(f"Not yet ({case.what}): {message}")
            return False
    count = "both" if len(cases) == 2 else f"all {len(cases)}"
    say(f"Correct: `{name}` agrees with the book's on {count} cases ({'; '.join(c.what for c in cases)}).")
    return True


# ---------------------------------------------------------------------------------------------- chapter 0


def _padded_batch(adapter, image) -> dict:
    """Two prompts of different lengths with one image each: the processor left-pads the shorter one."""
    return adapter.inputs([image, image], ["What is in the image?",
                                           "Describe the image, then say which colour the largest object has."])


def check_image_token_positions(fn, adapter, batch, image) -> bool | None:
    """`fn(input_ids, image_token_id)` -> (batch, n_visual) positions of the image tokens."""
    two = _padded_batch(adapter, image)["input_ids"]
    cases = [Case("the page's prompt", (batch["input_ids"], adapter.image_token_id)),
             Case("two prompts of different lengths, left-padded", (two, adapter.image_token_id)),
             Case("the second of them alone", (two[1:], adapter.image_token_id))]
    for c in cases:
        c.axes, c.names = ("item", "visual token"), ("input_ids", "image_token_id")
    return run_cases("image_token_positions", fn, cases)


def check_patch_boxes(fn, adapter) -> bool | None:
    """`fn(rows, cols, patch)` -> (rows * cols, 4) boxes (x0, y0, x1, y1), row by row."""
    rows, cols = adapter.grid if isinstance(adapter.grid, tuple) else (adapter.grid, adapter.grid)
    cases = [Case(f"the page's {rows} x {cols} grid of {adapter.patch_size} px patches",
                  (rows, cols, adapter.patch_size)),
             Case("a grid of 2 rows and 3 columns", (2, 3, 10)),
             Case("one patch", (1, 1, 14)),
             Case("patches 7.5 px wide (after a resize)", (3, 2, 7.5))]
    for c in cases:
        c.axes = ("token", "coordinate (x0, y0, x1, y1)")
    return run_cases("patch_boxes", fn, cases)


def check_merge_visual_tokens(fn, adapter, batch, image) -> bool | None:
    """`fn(text_embeds, input_ids, image_token_id, features)` -> the LLM's input sequence."""
    cases = []
    for what, b in (("the page's prompt", batch), ("two prompts of different lengths, left-padded",
                                                  _padded_batch(adapter, image))):
        ids = b["input_ids"]
        text = adapter.input_embeddings(torch.where(ids == adapter.image_token_id, 0, ids)).detach()
        features = readout.visual_embeddings(adapter, b)
        if len(ids) > 1:  # each item its own image features: an item given another's tokens shows
            features = features * torch.arange(1, len(ids) + 1, dtype=features.dtype)[:, None, None]
        cases.append(Case(what, (text, ids, adapter.image_token_id, features), ("item", "position", "channel"),
                          names=("text_embeds", "input_ids", "image_token_id", "features")))
    return run_cases("merge_visual_tokens", fn, cases)


# ---------------------------------------------------------------------------------------------- chapter 1


def _answer_reads_selection(adapter, batch, selection):
    """The page's knockout: (input_ids, seq_len, keys, queries), keys the selection's positions and queries
    the answer position (the last), both (batch, seq) bool."""
    ids = batch["input_ids"]
    keys = interventions.on_sequence(adapter, ids, selection)  # (batch, seq)
    last = torch.zeros_like(keys)
    last[:, -1] = True
    return ids, ids.shape[1], keys, last


def check_block_matrix(fn, adapter, batch, selection) -> bool | None:
    """`fn(seq_len, queries, keys)` -> (batch, seq, seq) bool, True where query q must not attend to key k."""
    ids, seq, keys, last = _answer_reads_selection(adapter, batch, selection)
    two_keys = torch.cat([keys, ~keys & (ids != adapter.tokenizer.pad_token_id)])[:2]
    two_last = torch.cat([last, last])[:2]
    cases = [Case("the page's selection -> the answer position", (seq, last, keys)),
             Case("two items, each its own key positions", (seq, two_last, two_keys)),
             Case("positions as indices: the last two queries, the first three keys",
                  (seq, torch.tensor([[seq - 2, seq - 1]]), torch.tensor([[0, 1, 2]]))),
             Case("an empty selection", (seq, last, torch.zeros_like(keys)))]
    for c in cases:
        c.axes, c.names = ("item", "query", "key"), ("seq_len", "queries", "keys")
    return run_cases("block_matrix", fn, cases)


def check_knockout_mask(fn, adapter, batch, selection) -> bool | None:
    """`fn(mask, block, n_q, n_k)` -> the layer's attention mask with the blocked edges closed."""
    ids, seq, keys, last = _answer_reads_selection(adapter, batch, selection)
    block = interventions.block_matrix(seq, last | keys.roll(1, 1), keys)  # (batch, seq, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(len(ids), 1, seq, seq)
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    cases = [Case("an additive float mask (eager attention)", (additive, block, seq, seq)),
             Case("a bool mask (sdpa with padding)", (causal, block, seq, seq)),
             Case("no mask (sdpa without padding: causal)", (None, block, seq, seq)),
             Case("a generation step: one query, a cache of seq keys plus the new one",
                  (additive[..., -1:, :].expand(-1, -1, 1, seq).contiguous(), block, 1, seq)),
             Case("a float mask from a cache one longer than the prompt", (
                 torch.zeros(len(ids), 1, 1, seq + 1), block, 1, seq + 1))]
    for c in cases:
        c.axes, c.names = ("item", "head", "query", "key"), ("mask", "block", "n_q", "n_k")
    return run_cases("knockout_mask", fn, cases)


def _hooks(model: nn.Module) -> set[tuple[int, str, int]]:
    """Every forward (pre-)hook registered on the model's modules: (module, kind, hook id)."""
    return {(id(m), kind, key) for m in model.modules()
            for kind in ("_forward_pre_hooks", "_forward_hooks") for key in getattr(m, kind)}


def _remove_hooks(model: nn.Module, hooks: set) -> None:
    for m in model.modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            for key in [k for k in getattr(m, kind) if (id(m), kind, k) in hooks]:
                del getattr(m, kind)[key]


def check_mean_ablated_logits(fn, adapter, batch, selection, mean, image) -> bool | None:
    """`fn(adapter, batch, selection, mean)` -> (batch, vocab) answer logits with the selected tokens replaced."""
    selection = torch.as_tensor(selection, dtype=torch.bool)
    two = _padded_batch(adapter, image)
    rng = np.random.default_rng(0)
    n_visual = selection.shape[1]
    own = torch.as_tensor(np.stack([rng.random(n_visual) < 0.5, rng.random(n_visual) < 0.25]))
    with torch.no_grad():
        readout.answer_logits(adapter, batch)  # transformers registers its own hooks on a first forward pass
    hooks = _hooks(adapter.model)

    def after(args):
        left = _hooks(adapter.model) - hooks
        if left:
            _remove_hooks(adapter.model, left)  # or every later forward pass is edited
            return (f"{len(left)} hook(s) were still registered after your function returned: remove each one "
                    "(`handle.remove()`, in a `finally:` block), or every later forward pass is edited too. "
                    "The check removed them.")
        return None

    run = lambda f, args: f(adapter, *args)  # noqa: E731  the adapter is shared, not copied
    cases = [Case("the page's prompt and selection", (batch, selection, mean)),
             Case("two prompts of different lengths (left padding), each its own selection", (two, own, mean)),
             Case("an empty selection (nothing replaced)", (batch, torch.zeros_like(selection), mean)),
             Case("every visual token selected", (two, torch.ones_like(own), mean))]
    for c in cases:
        c.axes, c.run, c.after, c.tolerance = ("item", "vocabulary entry"), run, after, 1e-4
        c.names = ("batch", "selection", "mean")
    return run_cases("mean_ablated_logits", fn, cases)


# ---------------------------------------------------------------------------------------------- chapter 2


def check_logit_lens(fn, adapter, states) -> bool | None:
    """`fn(hidden, final_norm, unembedding)` -> (..., vocab) probabilities. `states`: (depths, batch,
    n_visual, d_model), the residual stream at the visual tokens (`readout.visual_hidden_states`)."""
    middle, last = states.shape[0] // 2, states.shape[0] - 1
    run = lambda f, args: f(args[0], adapter.final_norm, adapter.unembedding)  # noqa: E731
    cases = [Case(f"one image's visual tokens at depth {middle}", (states[middle, 0],)),
             Case(f"the last depth ({last})", (states[last, 0],)),
             Case("a batch of images: (batch, n_visual, d_model)", (states[middle, :2],))]
    for c in cases:
        c.axes, c.run, c.names = ("token", "vocabulary entry"), run, ("hidden",)
    cases[-1].axes = ("item", "token", "vocabulary entry")
    return run_cases("logit_lens", fn, cases)


def _tie_tolerant(bank: torch.Tensor, queries: torch.Tensor):
    """Runs a search and replaces its rows by the scores they have: two rows with equal scores are both right."""
    def run(f, args):
        scores, rows = f(*args)
        rows_np = np.asarray(rows)
        found = np.where(rows_np >= 0, (queries.float() @ bank.float().T).numpy()[
            np.arange(len(rows_np))[:, None], np.clip(rows_np, 0, None)], -np.inf)
        return np.asarray(scores), found
    return run


def check_exact_search(fn, index, states, layer: int) -> bool | None:
    """`fn(bank, queries, k)` -> (scores, rows), each (n_queries, k), best first. `states`: (n, d_model) visual
    tokens; the bank is the index's layer `layer` (fp16 unit vectors)."""
    bank = index.embeddings[layer]
    queries = states.float() / states.float().norm(dim=-1, keepdim=True)
    cases = [Case(f"the page's visual tokens in the index's layer {layer}, k = 5", (bank, queries, 5)),
             Case("one query, k = 1", (bank, queries[:1], 1)),
             Case("a bank of 3 rows, k = 5 (pad with score -inf and row -1)", (bank[:3], queries[:4], 5))]
    for c in cases:
        c.axes, c.tolerance, c.names = ("query", "rank"), 2e-3, ("bank", "queries", "k")
        c.run = _tie_tolerant(c.args[0], c.args[1])
    return run_cases("exact_search", fn, cases)


def check_merge_official(fn, index, states, k: int = 5) -> bool | None:
    """`fn(sims, rows, from_layer, k)` -> the k best of all layers' candidates, per query (three arrays)."""
    sims, rows, from_layer = index.candidates(states, k)  # (n, layers * k) each
    padded = [np.concatenate([x, np.full((len(x), 2), fill, x.dtype)], axis=1)
              for x, fill in ((sims, -np.inf), (rows, -1), (from_layer, -1))]
    tied = [x.copy() for x in (sims, rows, from_layer)]
    tied[0][:, 1::2] = tied[0][:, ::2][:, :tied[0][:, 1::2].shape[1]]  # pairs of equal similarity
    cases = [Case(f"the page's visual tokens, {len(index.layers)} layers, k = {k}", (sims, rows, from_layer, k)),
             Case("k = 1", (sims, rows, from_layer, 1)),
             Case("ties in similarity: the earlier candidate first", (*tied, k)),
             Case("padded candidates (score -inf, row -1) at the end", (*padded, k))]
    for c in cases:
        c.axes, c.names = ("query", "rank"), ("sims", "rows", "from_layer", "k")
    return run_cases("merge_official", fn, cases)


# ---------------------------------------------------------------------------------------------- chapter 3


def check_tv_l2(fn, pixels) -> bool | None:
    """`fn(pixels)` -> the scalar TV-L2 prior of (n, 3, h, w) pixels."""
    gen = torch.Generator().manual_seed(0)
    cases = [Case("the page's image", (pixels[:1],)),
             Case("a batch of two", (torch.cat([pixels[:1], torch.rand(pixels[:1].shape, generator=gen)]),)),
             Case("a 3 x 2 image", (torch.rand(1, 3, 3, 2, generator=gen),)),
             Case("a flat image (no variation)", (torch.full((1, 3, 8, 8), 0.5),))]
    for c in cases:
        c.names = ("pixels",)
    return run_cases("tv_l2", fn, cases)


def check_patch_boundary_loss(fn, pixels, patch_size: int) -> bool | None:
    """`fn(pixels, patch_size)` -> the scalar patch prior."""
    gen = torch.Generator().manual_seed(0)
    size = pixels.shape[-1]
    cases = [Case(f"the page's image, {patch_size} px patches", (pixels[:1], patch_size)),
             Case("a patch size that does not divide the image", (pixels[:1], max(2, patch_size - 1))),
             Case("a batch of two, 4 px patches", (torch.rand(2, 3, 12, 12, generator=gen), 4)),
             Case("an image smaller than one patch (no boundary: 0)", (pixels[:1, :, :3, :3], size))]
    for c in cases:
        c.names = ("pixels", "patch_size")
    return run_cases("patch_boundary_loss", fn, cases)


def check_inversion_step(fn, adapter, batch, stats, config) -> bool | None:
    """`fn(adapter, pixels, optimizer, lr, batch, stats, config, generator)` -> each term's value; two steps are
    taken from the same start, so a gradient carried over from the first step shows in the second."""
    size = adapter.image_size
    start = torch.Generator().manual_seed(0)
    gray = (0.5 + 0.05 * torch.randn(len(batch["input_ids"]), 3, size, size, generator=start)).clamp(0, 1)
    near_white = (0.98 + 0.02 * torch.rand(gray.shape, generator=start)).clamp(0, 1)

    def two_steps(lr):
        def run(f, args):
            pixels = args[0].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([pixels], lr=lr, betas=config.betas)
            generator = torch.Generator().manual_seed(config.seed)
            flags = [p.requires_grad for p in adapter.model.parameters()]
            adapter.model.requires_grad_(False)
            try:
                terms = [f(adapter, pixels, optimizer, lr, batch, stats, config, generator) for _ in range(2)]
            finally:
                for p, flag in zip(adapter.model.parameters(), flags):
                    p.requires_grad_(flag)
            return terms[0], terms[1], pixels.detach()
        return run

    cases = [Case("two steps from a gray start", (gray,), run=two_steps(config.lr)),
             Case("two large steps from a near-white start (clamping to [0, 1] matters)", (near_white,),
                  run=two_steps(0.5))]
    for c in cases:
        c.tolerance, c.names = 1e-4, ("pixels",)
    return run_cases("inversion_step", fn, cases)


# ---------------------------------------------------------------------------------------------- chapter 4


def _factors(weight: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = weight.shape
    return (0.01 * torch.randn(rank, in_features, generator=gen), 0.01 * torch.randn(out_features, rank, generator=gen))


def _linear_names(adapter, count: int) -> list[str]:
    """Module paths, in the whole model, of the first `count` linear layers of the LLM's decoder layers."""
    path = {id(m): n for n, m in adapter.model.named_modules()}
    linears = [m for layer in adapter.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    return [path[id(m)] for m in linears[:count]]


def check_lora_delta(fn, adapter, lora_file=None) -> bool | None:
    """`fn(lora_A, lora_B, alpha, rank)` -> (out, in) update. With `lora_file` (a model's lora.safetensors) the
    first case is a real pair of factors from it; the others are factors shaped like the LLM's first layers."""
    import json

    from safetensors.torch import load_file
    cases = []
    if lora_file is not None:
        tensors, meta = load_file(str(lora_file)), json.loads(lora_file.with_suffix(".json").read_text())
        key = next(k for k in tensors if k.endswith(".lora_A"))
        cases.append(Case(f"the tuned model's {key.removesuffix('.lora_A')}", (
            tensors[key], tensors[key.removesuffix("lora_A") + "lora_B"], meta["alpha"], meta["rank"])))
    for i, (name, rank, alpha) in enumerate(zip(_linear_names(adapter, 2), (8, 1), (16, 4))):
        a, b = _factors(adapter.model.get_submodule(name).weight, rank, i)
        cases.append(Case(f"{name}, rank {rank}, alpha {alpha}", (a, b, alpha, rank)))
    for c in cases:
        c.axes, c.names = ("output", "input"), ("lora_A", "lora_B", "alpha", "rank")
    return run_cases("lora_delta", fn, cases)


def _partial_copy(model: nn.Module, names: list[str]) -> nn.Module:
    """A small module tree holding copies of only the named layers, at the same paths: a merge can be tried on it
    without touching (or copying) the whole model."""
    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, copy.deepcopy(model.get_submodule(name)).float())
    return root


def check_merge_updates(fn, adapter) -> bool | None:
    """`fn(model, updates)` adds each update to the weight at its module path, in place. Tried on copies of the
    LLM's first linear layers, never on the model itself."""
    model = adapter.model
    names = _linear_names(adapter, 3)
    updates = {}
    for i, name in enumerate(names):
        a, b = _factors(model.get_submodule(name).weight, 4, 10 + i)
        updates[name] = embedded.lora_delta(a, b, 8, 4)

    def run(f, args):
        target = _partial_copy(model, names)
        result = f(target, args[0])
        if result is not None and result is not target:
            raise ValueError("merge in place and return nothing: the model's own weights must change")
        return tuple(target.get_submodule(n).weight.detach() for n in names)

    cases = [Case(f"{len(names)} updates, on copies of {', '.join(names)}", (updates,)),
             Case("one update", ({names[0]: updates[names[0]]},)),
             Case("no update (nothing changes)", ({},))]
    for c in cases:
        c.run, c.axes, c.names = run, ("output", "input"), ("updates",)
    return run_cases("merge_updates", fn, cases)


# ---------------------------------------------------------------------------------------------- student edition

SOLUTION_TAG = "solution"  # a cell that solves an exercise: folded in the book, absent from the student edition
_FOLDED_SOLUTION = re.compile(r"\n*<details>\s*<summary>Solution</summary>.*?</details>\n*", re.DOTALL)
STUDENT_NOTE = ("*Student edition.* This is the book's chapter without its solutions: the cells tagged "
                "`solution` and the folded answers are taken out, and every check still runs. Write each "
                "build-it function, then run its check.")


def student_edition(notebook: dict) -> dict:
    """A chapter (nbformat JSON) for students: solution cells and folded solutions removed, outputs cleared, a
    note under the title. Generated from the chapter itself, so it never drifts from the book."""
    out = copy.deepcopy(notebook)
    cells = []
    for cell in out["cells"]:
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        if cell["cell_type"] == "markdown":
            text = _FOLDED_SOLUTION.sub("\n\n", "".join(cell["source"])).strip("\n")
            cell["source"] = text.splitlines(keepends=True)
        else:
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    note = {"cell_type": "markdown", "id": "student-edition-note", "metadata": {}, "source": [STUDENT_NOTE]}
    out["cells"] = cells[:1] + [note] + cells[1:]
    return out
