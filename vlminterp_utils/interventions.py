"""Interventions on visual tokens: capture, ablation, token selection, attention knockout, flip metrics.

Everything works on batches and on any model the adapter supports. Hooks are registered inside context managers
and removed on exit, also when the body raises.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import shapes, weights

MEAN_TOKEN_SEED = 20_000  # scenes for the dataset-mean visual token: disjoint from training and evaluation


# ---------------------------------------------------------------------------------------------- capture

@torch.no_grad()
def forward(adapter, batch: dict, hidden_states: bool = False, attentions: bool = False):
    """One forward pass; hidden states of every layer (embeddings first) and attention weights on request."""
    if attentions and adapter.attn_implementation != "eager":
        raise ValueError("attention weights need eager attention: model.set_attn_implementation('eager')")
    return adapter.model(**batch, output_hidden_states=hidden_states, output_attentions=attentions)


@torch.no_grad()
def visual_embeddings(adapter, batch: dict) -> torch.Tensor:
    """(batch, n_visual, d_model): the visual tokens as the LLM receives them (projector output)."""
    captured = {}
    handle = adapter.projector.register_forward_hook(lambda m, i, out: captured.setdefault("x", out))
    try:
        adapter.model(**batch)
    finally:
        handle.remove()
    return captured["x"]


@torch.no_grad()
def visual_hidden_states(adapter, examples: list[shapes.Example]) -> torch.Tensor:
    """(layers + 1, batch, n_visual, d_model): every layer's hidden state at the visual tokens."""
    batch = adapter.inputs([e.scene.image for e in examples], [e.question for e in examples])
    hidden = forward(adapter, batch, hidden_states=True).hidden_states
    pos = adapter.visual_positions(batch["input_ids"])
    rows = torch.arange(len(examples))[:, None]
    return torch.stack([h[rows, pos] for h in hidden])


def answer_logits(adapter, batch: dict) -> torch.Tensor:
    """Logits of the first answer token: the last position of every (left-padded) prompt."""
    return adapter.model(**batch, logits_to_keep=1).logits[:, -1]


# ---------------------------------------------------------------------------------------------- ablation

@contextmanager
def replace_visual_tokens(adapter, token_mask: torch.Tensor, value: torch.Tensor):
    """Within the block, visual tokens where `token_mask` (batch, n_visual) is True are replaced by `value`.

    `value` is a vector (d_model,), or per token (n_visual, d_model) or (batch, n_visual, d_model). The hook
    sits on the projector's output, which runs once per prompt (prefill), so generated tokens are untouched.
    """
    token_mask = torch.as_tensor(token_mask, dtype=torch.bool)

    def hook(module, inputs, out):
        if token_mask.shape != out.shape[:2]:
            raise ValueError(f"token mask {tuple(token_mask.shape)} does not match the visual tokens "
                             f"{tuple(out.shape[:2])} (batch, n_visual)")
        v = value.to(out.dtype).to(out.device).expand_as(out)
        mask = token_mask.to(out.device)[..., None]
        return torch.where(mask, v, out)

    handle = adapter.projector.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ablate(adapter, token_mask, mode: str | torch.Tensor = "mean", mean_token: torch.Tensor | None = None):
    """Mean-, zero- or vector-ablate the chosen visual tokens (a context manager)."""
    if isinstance(mode, torch.Tensor):
        return replace_visual_tokens(adapter, token_mask, mode)
    if mode == "zero":
        return replace_visual_tokens(adapter, token_mask, torch.zeros(adapter.text_config.hidden_size))
    if mode == "mean":
        return replace_visual_tokens(adapter, token_mask, mean_token if mean_token is not None
                                     else mean_visual_token(adapter))
    raise ValueError(f"unknown ablation mode {mode!r}: use 'mean', 'zero' or a tensor")


def mean_visual_token(adapter, n_images: int = 64, seed: int = MEAN_TOKEN_SEED, batch_size: int = 16,
                      cache: bool = True) -> torch.Tensor:
    """The dataset-mean visual token over held-out shapes-world scenes (all positions), cached as safetensors."""
    key = json.dumps([adapter.config.name_or_path, n_images, seed, adapter.image_size,
                      float(adapter.projector.parameters().__next__().double().sum())])
    path = weights.cache_dir() / "mean_tokens" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".safetensors")
    if cache and path.exists():
        return load_file(str(path))["mean"]
    total, count = None, 0
    for start in tqdm(range(0, n_images, batch_size), desc="mean visual token", leave=False):
        exs = [shapes.example(seed, i, "caption", size=adapter.image_size)
               for i in range(start, min(start + batch_size, n_images))]
        batch = adapter.inputs([e.scene.image for e in exs], [e.question for e in exs])
        emb = visual_embeddings(adapter, batch).float()
        total = emb.sum((0, 1)) if total is None else total + emb.sum((0, 1))
        count += emb.shape[0] * emb.shape[1]
    mean = (total / count).cpu()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        save_file({"mean": mean.contiguous()}, str(tmp))
        tmp.replace(path)
    return mean


# ---------------------------------------------------------------------------------------------- token selection

def object_tokens(scene: shapes.Scene, patch_size: int, buffer: int = 0,
                  objects: Sequence[int] | None = None) -> np.ndarray:
    """(n_visual,) bool, row-major like the patch sequence: the tokens of the chosen objects, dilated by `buffer`."""
    cells = scene.object_cells(patch_size, buffer)
    chosen = range(len(cells)) if objects is None else objects
    return np.logical_or.reduce([cells[i] for i in chosen]).ravel()


def random_tokens(n_visual: int, count: int, rng: np.random.Generator,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """`count` tokens drawn uniformly (seeded), optionally outside `exclude`."""
    pool = np.flatnonzero(~exclude) if exclude is not None else np.arange(n_visual)
    if count > len(pool):
        raise ValueError(f"cannot draw {count} random tokens from {len(pool)} candidates")
    mask = np.zeros(n_visual, bool)
    mask[rng.choice(pool, size=count, replace=False)] = True
    return mask


def high_norm_tokens(embeddings: torch.Tensor, count: int | None = None) -> np.ndarray:
    """Tokens with outlying norms ('registers'): norm > mean + 2 std over the image, or the `count` largest."""
    norms = embeddings.float().norm(dim=-1).cpu().numpy()
    if count is None:
        return norms > norms.mean() + 2 * norms.std()
    mask = np.zeros(len(norms), bool)
    mask[np.argsort(-norms)[:count]] = True
    return mask


def integrated_gradients(adapter, batch: dict, answer_ids: torch.Tensor, baseline: torch.Tensor,
                         steps: int = 16) -> torch.Tensor:
    """(batch, n_visual) attributions of each visual token to the logit of the answer token at the last position.

    Integrated gradients along the straight path from `baseline` (e.g. the mean visual token) to the real visual
    tokens, with `steps` Riemann steps; a token's score is the sum over its dimensions.
    """
    real = visual_embeddings(adapter, batch)
    base = baseline.to(real.dtype).to(real.device).expand_as(real)
    grads = torch.zeros_like(real, dtype=torch.float32)
    rows = torch.arange(real.shape[0], device=real.device)
    for alpha in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
        point = (base + alpha * (real - base)).detach().requires_grad_(True)
        handle = adapter.projector.register_forward_hook(lambda m, i, o: point)
        try:
            with torch.enable_grad():
                logits = answer_logits(adapter, batch)
                logits[rows, answer_ids.to(real.device)].sum().backward()
        finally:
            handle.remove()
        grads += point.grad.float()
    return ((real - base).float() * grads / steps).sum(-1)


def top_k_mask(scores: torch.Tensor, count: int) -> np.ndarray:
    mask = np.zeros(scores.shape[-1], bool)
    mask[np.argsort(-scores.detach().cpu().numpy())[:count]] = True
    return mask


# ---------------------------------------------------------------------------------------------- knockout

def layer_windows(n_layers: int, k: int) -> list[list[int]]:
    """Sliding windows of k consecutive layers, one starting at each layer (truncated at the top)."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"window size must be in 1..{n_layers}, got {k}")
    return [list(range(s, min(s + k, n_layers))) for s in range(n_layers)]


def depth_presets(n_layers: int) -> dict[str, list[int]]:
    """Neo et al.'s early / middle / late thirds of the LLM."""
    third = np.array_split(np.arange(n_layers), 3)
    return {name: part.tolist() for name, part in zip(("early", "middle", "late"), third)}


def block_matrix(seq_len: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(batch, seq, seq) bool, True where query position q must not attend to key position k.

    `queries` and `keys` are (batch, seq) bool masks of positions, or (batch, n) index tensors.
    """
    def as_mask(x):
        x = torch.as_tensor(x)
        if x.dtype == torch.bool:
            return x
        m = torch.zeros(x.shape[0], seq_len, dtype=torch.bool)
        return m.scatter_(1, x.long(), True)
    q, k = as_mask(queries), as_mask(keys)
    return q[:, :, None] & k[:, None, :]


def _knocked_out(mask: torch.Tensor | None, block: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """The layer's attention mask with the blocked edges closed, in the mask's own convention."""
    b = block.shape[0]
    pad_k = max(n_k - block.shape[2], 0)
    sub = torch.nn.functional.pad(block, (0, pad_k, 0, pad_k))[:, -n_q:, :n_k] if pad_k else block[:, -n_q:, :n_k]
    if mask is None:  # sdpa without padding passes no mask and relies on is_causal: build the causal mask
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=block.device).tril(n_k - n_q)[None, None]
    sub = sub.to(mask.device)[:, None]
    mask = mask.expand(b, 1, n_q, n_k)
    if mask.dtype == torch.bool:  # True = may attend
        return mask & ~sub
    return mask.masked_fill(sub, torch.finfo(mask.dtype).min)  # additive float mask


@contextmanager
def attention_knockout(adapter, block: torch.Tensor, layers: Iterable[int]):
    """Block attention along the edges of `block` (batch, seq, seq) in the chosen decoder layers.

    Works on the attention mask each layer receives, so it is exact in eager and sdpa attention, whatever mask
    convention arrives (none, bool or additive float); other implementations are refused rather than ignored.
    """
    if adapter.attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"knockout supports eager and sdpa attention, not {adapter.attn_implementation!r}: "
                         "model.set_attn_implementation('sdpa')")
    handles = []

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = kwargs.get("past_key_values")
        n_q = hidden.shape[1]
        n_k = n_q + (cache.get_seq_length(module.layer_idx) if cache is not None else 0)
        kwargs["attention_mask"] = _knocked_out(kwargs.get("attention_mask"), block, n_q, n_k)
        return args, kwargs

    try:
        for i in layers:
            handles.append(adapter.attention(i).register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def reference_knockout_logits(adapter, batch: dict, block: torch.Tensor, layers: Iterable[int]) -> torch.Tensor:
    """Answer logits from a from-scratch attention that masks blocked scores with -inf: the knockout's reference.

    Its causal and padding masks are rebuilt here from positions and the batch's attention mask, independently
    of what the model passes around.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    layers, pad = set(layers), batch["attention_mask"].bool()

    def reference(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        n_q, n_k = query.shape[2], key.shape[2]
        k, v = (repeat_kv(t, module.num_key_value_groups) for t in (key, value))
        scores = (query @ k.transpose(2, 3)) * scaling
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)[None] & pad[:, None, -n_k:]
        diagonal = torch.zeros(n_q, n_k, dtype=torch.bool)
        diagonal[torch.arange(n_q), torch.arange(n_q) + n_k - n_q] = True
        allowed |= diagonal[None]  # fully padded rows attend to themselves rather than to nothing
        if module.layer_idx in layers:
            allowed &= ~block[:, -n_q:, :n_k]
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("vlminterp_reference", reference)
    text_config = adapter.text_config
    previous = text_config._attn_implementation
    text_config._attn_implementation = "vlminterp_reference"
    try:
        with torch.no_grad():
            return answer_logits(adapter, batch)
    finally:
        text_config._attn_implementation = previous


# ---------------------------------------------------------------------------------------------- metrics

def flip_rate(correct_before: Sequence[bool], correct_after: Sequence[bool]) -> float:
    """Share of initially-correct answers that are wrong after the intervention."""
    before, after = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    if not before.any():
        return float("nan")
    return float((~after[before]).mean())


def bootstrap_ci(correct_before, correct_after, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Flip rate with a percentile bootstrap confidence interval over the initially-correct examples."""
    before, after = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    flips = ~after[before]
    if len(flips) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    samples = flips[rng.integers(0, len(flips), size=(n_boot, len(flips)))].mean(1)
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(flips.mean()), float(lo), float(hi)
