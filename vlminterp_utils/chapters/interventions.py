"""Interventions on visual tokens: ablation, token selection, attribution, attention knockout.

Everything works on batches and on any model the adapter supports. Hooks are registered inside context managers
and removed on exit, also when the body raises.

Two conventions hold for every intervention. Layers: decoder layers are numbered 0 .. n_layers - 1 (the knockout's
`layers`); the residual stream a lens reads has depths 0 .. n_layers, depth d + 1 being what layer d writes
(`readout.record_residual_stream`). Token selections: a selection of visual tokens is a (batch, n_visual) bool
mask, in the visual tokens' sequence order (the ablation's `token_mask`, `object_tokens`); attention edges also
involve text positions, so the knockout takes (batch, seq) masks over the whole sequence, made from visual
masks with `on_sequence`.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import shapes, sites
from ..core.sites import capture
from ..core.readout import answer_logits, edit_visual_inputs, visual_embeddings
from ..core.storage import cache_key, cached_tensors

MEAN_TOKEN_SEED = 20_000  # scenes for the dataset-mean visual token: disjoint from training and evaluation


# ---------------------------------------------------------------------------------------------- ablation

def replace_visual_tokens(adapter, token_mask: torch.Tensor, value: torch.Tensor,
                          deepstack_value: torch.Tensor | None = None):
    """Within the block (a context manager), visual tokens where `token_mask` (batch, n_visual) is True are
    replaced by `value`: a vector (d_model,), or per token (n_visual, d_model) or (batch, n_visual, d_model).

    The replacement happens where the LLM receives the visual tokens, once per prompt, so generated tokens are
    untouched. Where the LLM receives them more than once (Qwen3-VL's DeepStack adds features to the visual
    tokens after its first layers), the chosen tokens' features there are replaced too: by `deepstack_value`
    (levels, d_model), by default zero (nothing added), so no trace of the token reaches the LLM.
    """
    token_mask = torch.as_tensor(token_mask, dtype=torch.bool)

    def swap(visual, v):
        if token_mask.shape != visual.shape[:2]:
            raise ValueError(f"token mask {tuple(token_mask.shape)} does not match the visual tokens "
                             f"{tuple(visual.shape[:2])} (batch, n_visual)")
        v = v.to(visual.dtype).to(visual.device).expand_as(visual)
        return torch.where(token_mask.to(visual.device)[..., None], v, visual)

    def swap_deepstack(level, features):
        return swap(features, torch.zeros(()) if deepstack_value is None else deepstack_value[level])

    return edit_visual_inputs(adapter, lambda visual: swap(visual, value), swap_deepstack)


def mean_ablated_logits(adapter, batch: dict, selection: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) answer logits with the selected visual tokens, (batch, n_visual) bool, replaced by `mean`
    (d_model,) where the LLM receives them; the hook is gone when this returns."""
    with replace_visual_tokens(adapter, selection, mean):
        return answer_logits(adapter, batch)


def ablate(adapter, token_mask, mode: str | torch.Tensor = "mean", mean_token: torch.Tensor | None = None):
    """Mean-, zero- or vector-ablate the chosen visual tokens (a context manager). With DeepStack (Qwen3-VL),
    the mean ablation puts each level's mean feature in place of the token's, the others zero."""
    if isinstance(mode, torch.Tensor):
        return replace_visual_tokens(adapter, token_mask, mode)
    if mode == "zero":
        return replace_visual_tokens(adapter, token_mask, torch.zeros(adapter.text_config.hidden_size))
    if mode == "mean":
        deepstack = mean_deepstack_features(adapter) if adapter.deepstack_levels else None
        return replace_visual_tokens(adapter, token_mask, mean_token if mean_token is not None
                                     else mean_visual_token(adapter), deepstack)
    raise ValueError(f"unknown ablation mode {mode!r}: use 'mean', 'zero' or a tensor")


def mean_visual_token(adapter, n_images: int = 64, seed: int = MEAN_TOKEN_SEED, batch_size: int = 16,
                      cache: bool = True) -> torch.Tensor:
    """The dataset-mean visual token over held-out shapes-world scenes (every token that shows a patch), cached as
    safetensors."""
    return _mean_tokens(adapter, n_images, seed, batch_size, cache)["mean"]


def mean_deepstack_features(adapter, n_images: int = 64, seed: int = MEAN_TOKEN_SEED, batch_size: int = 16,
                            cache: bool = True) -> torch.Tensor:
    """(levels, d_model): Qwen3-VL's mean DeepStack feature per level, over the scenes of `mean_visual_token`."""
    if not adapter.deepstack_levels:
        raise ValueError(f"{adapter.family} adds no DeepStack features: its visual tokens enter only at the input")
    return _mean_tokens(adapter, n_images, seed, batch_size, cache)["deepstack"]


def _mean_tokens(adapter, n_images, seed, batch_size, cache) -> dict[str, torch.Tensor]:
    fingerprint = float(next(adapter.projector.parameters()).double().sum())  # retrained weights: a new key
    key = cache_key(adapter.config.name_or_path, n_images, seed, adapter.image_size, fingerprint)

    def build():
        total, deepstack, count = 0.0, 0.0, 0
        for start in tqdm(range(0, n_images, batch_size), desc="mean visual token", leave=False):
            exs = [shapes.example(seed, i, "caption", size=adapter.image_size)
                   for i in range(start, min(start + batch_size, n_images))]
            batch = adapter.inputs([e.scene.image for e in exs], [e.question for e in exs])
            shown = adapter.patch_tokens(exs[0].scene.image.size)
            embeds, call = capture(adapter, "llm_input", batch, with_call=True)
            positions = adapter.visual_positions(batch["input_ids"]).to(embeds.device)
            emb = embeds[torch.arange(len(exs), device=embeds.device)[:, None], positions].float()[:, shown]
            total = total + emb.sum((0, 1))
            count += emb.shape[0] * emb.shape[1]
            if adapter.deepstack_levels:  # (levels, batch, n_visual, d) -> summed over the shown tokens
                levels = torch.stack([f.view(*positions.shape, -1) for f in call["deepstack_visual_embeds"]])
                deepstack = deepstack + levels.float()[:, :, shown].sum((1, 2))
        out = {"mean": (total / count).cpu()}
        return {**out, "deepstack": (deepstack / count).cpu()} if adapter.deepstack_levels else out

    return cached_tensors("mean_tokens", key, build, cache=cache)


# ---------------------------------------------------------------------------------------------- token selection

def object_tokens(adapter, scene: shapes.Scene, buffer: int = 0, objects: Sequence[int] | None = None) -> np.ndarray:
    """(n_visual,) bool, in sequence order: the tokens that show the chosen objects (all by default), grown by
    `buffer` tokens on every side, found through the processor's own transforms (`core.geometry`)."""
    chosen = range(len(scene.objects)) if objects is None else objects
    mask = np.logical_or.reduce([scene.objects[i].mask for i in chosen])
    return adapter.object_tokens(mask, buffer)


def random_tokens(n_visual: int, count: int, rng: np.random.Generator,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """`count` tokens drawn uniformly (seeded), optionally outside `exclude`."""
    pool = np.flatnonzero(~exclude) if exclude is not None else np.arange(n_visual)
    if count > len(pool):
        raise ValueError(f"cannot draw {count} random tokens from {len(pool)} candidates")
    mask = np.zeros(n_visual, bool)
    mask[rng.choice(pool, size=count, replace=False)] = True
    return mask


def high_norm_tokens(embeddings: torch.Tensor, count: int | None = None,
                     candidates: np.ndarray | None = None) -> np.ndarray:
    """Tokens with outlying norms ('registers'): norm > mean + 2 std over the image, or the `count` largest;
    only among `candidates` when given (e.g. the tokens that show a patch)."""
    norms = embeddings.float().norm(dim=-1).cpu().numpy()
    candidates = np.ones(len(norms), bool) if candidates is None else np.asarray(candidates, bool)
    if count is None:
        pool = norms[candidates]
        return candidates & (norms > pool.mean() + 2 * pool.std())
    return top_k_mask(torch.as_tensor(np.where(candidates, norms, -np.inf)), count)


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
        with edit_visual_inputs(adapter, lambda visual: point), torch.enable_grad():
            logits = answer_logits(adapter, batch)
            logits[rows, answer_ids.to(real.device)].sum().backward()
        grads += point.grad.float()
    return ((real - base).float() * grads / steps).sum(-1)


def top_k_mask(scores: torch.Tensor, count: int) -> np.ndarray:
    """The `count` highest-scoring tokens (ties in the order of the tokens)."""
    mask = np.zeros(scores.shape[-1], bool)
    mask[np.argsort(-scores.detach().cpu().numpy())[:count]] = True
    return mask


# ---------------------------------------------------------------------------------------------- knockout

def layer_windows(n_layers: int, k: int) -> list[list[int]]:
    """Sliding windows of k consecutive layers, one starting at each layer (truncated at the top)."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"window size must be in 1..{n_layers}, got {k}")
    return [list(range(s, min(s + k, n_layers))) for s in range(n_layers)]


# The official code's knockout presets for LLaVA-1.5's 32 layers (clemneo/llava-interp,
# scripts/attention_experiment_curate.py), as [start, end) ranges; `depth_presets` scales them to any depth.
OFFICIAL_PRESETS = {"early": (0, 10), "early-mid": (5, 15), "mid": (11, 21), "mid-late": (15, 25),
                    "late": (21, 32), "all": (0, 32)}


def depth_presets(n_layers: int) -> dict[str, list[int]]:
    """Neo et al.'s layer presets (early, early-mid, mid, mid-late, late, all), scaled from 32 layers to this depth."""
    scale = lambda b: min(n_layers, int(b * n_layers / 32 + 0.5))  # noqa: E731
    return {name: list(range(scale(a), max(scale(b), scale(a) + 1))) for name, (a, b) in OFFICIAL_PRESETS.items()}


def on_sequence(adapter, input_ids: torch.Tensor, visual_mask) -> torch.Tensor:
    """(batch, seq) bool: a selection of visual tokens, (batch, n_visual), placed at their sequence positions."""
    visual_mask = torch.as_tensor(visual_mask, dtype=torch.bool)
    positions = adapter.visual_positions(input_ids)  # (batch, n_visual)
    if visual_mask.shape != positions.shape:
        raise ValueError(f"visual mask {tuple(visual_mask.shape)} does not match the visual tokens "
                         f"{tuple(positions.shape)} (batch, n_visual)")
    out = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return out.scatter_(1, positions.to(out.device), visual_mask.to(out.device))


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


def knockout_mask(mask: torch.Tensor | None, block: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """A layer's attention mask with the blocked edges closed, in the mask's own convention.

    mask: (batch or 1, 1, n_q, n_k), bool (True: may attend) or additive float (0: may attend, the dtype's
    minimum: may not), or None (causal, no padding). block: (batch, seq, seq) bool, True where a query may not
    attend to a key. The layer's queries are the last n_q positions of the n_k keys (fewer when a cache holds
    the prompt); keys beyond the block's seq (generated tokens) are never blocked.
    """
    b = block.shape[0]
    pad_k = max(n_k - block.shape[2], 0)
    sub = torch.nn.functional.pad(block, (0, pad_k, 0, pad_k)) if pad_k else block  # (batch, >= n_k, >= n_k)
    sub = sub[:, :n_k, :n_k][:, -n_q:]  # (batch, n_q, n_k): the rows of the layer's queries
    if mask is None:  # sdpa without padding passes no mask and relies on is_causal: build the causal mask
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=block.device).tril(n_k - n_q)[None, None]
    sub = sub.to(mask.device)[:, None]  # (batch, 1, n_q, n_k): one mask for every head
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
    def close_edges(layer, mask, call):  # at the `attention_mask` site of each chosen layer
        hidden = call["hidden_states"] if "hidden_states" in call else call["args"][0]
        n_q = hidden.shape[1]
        if mask is not None:
            n_k = mask.shape[-1]
        else:  # keys: the cached ones (transformers 5.24 renamed `past_key_values` to `cache`) and the new ones
            cache = call.get("cache", call.get("past_key_values"))
            n_k = n_q + (cache.get_seq_length(layer) if cache is not None else 0)
        return knockout_mask(mask, block, n_q, n_k)

    with sites.hook(adapter, "attention_mask", close_edges, list(layers)):
        yield


def _cache_argument(module) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`: the name this version takes."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class CleanRun:
    """One clean forward pass, kept so that knockouts re-run only what they change.

    A knockout changes no position before its first blocked query (attention is causal) and no layer below its
    first layer. So from the clean run's keys and values and layer outputs, a knockout re-runs the positions from
    its first query on, through the layers from its first layer on: a knockout of the last position's attention
    is one position's forward pass over the cached prefix. The result equals the full re-run
    (`tests/test_interventions.py`, eager and sdpa, with padding).
    """

    @torch.no_grad()
    def __init__(self, adapter, batch: dict):
        self.adapter, self.attention_mask = adapter, batch["attention_mask"]
        captured, self.layer_outputs = {}, []

        def take_embeds(layer, embeds, call):
            captured["embeds"] = embeds
            captured["positions"] = call.get("position_ids")  # Qwen-VL's M-RoPE positions, computed outside
            captured["deepstack"] = (call.get("visual_pos_masks"), call.get("deepstack_visual_embeds"))
            captured["masks"] = call.get("attention_mask")  # Gemma 3: the masks it built, image blocks included

        def take_output(layer, output, call):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"decoder layer {layer} returns {type(output).__name__}, not a tensor: "
                                "CleanRun needs transformers>=5")
            self.layer_outputs.append(output)

        with sites.hook(adapter, "llm_input", take_embeds), \
                sites.hook(adapter, "layer_output", take_output, range(adapter.n_layers)):
            out = adapter.model(**batch, use_cache=True, logits_to_keep=1)
        self.embeds, self.positions, self.logits = captured["embeds"], captured["positions"], out.logits[:, -1]
        self.deepstack, self.masks = captured["deepstack"], captured["masks"]
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed `cache` in transformers 5.24
        self.keys_values = [(layer.keys, layer.values) for layer in cache.layers]
        self.cache_argument = _cache_argument(adapter.language_model)  # once, not per knockout

    def _prefix_cache(self, length: int):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.adapter.text_config)
        for i, (k, v) in enumerate(self.keys_values):
            cache.update(k[..., :length, :], v[..., :length, :], i)
        return cache

    def _replayed(self, layers: range, start: int):
        """Within the block, the chosen decoder layers return their clean outputs from `start` on, uncomputed."""
        return sites.hook(self.adapter, "layer_output", lambda layer, _, call: self.layer_outputs[layer][:, start:],
                          layers, skip=True)

    def _mask_from(self, start: int):
        """The attention mask for the replay of positions `start` on: the model's own per-layer-type masks, their
        query rows from `start` on, where it built them outside the LLM (Gemma 3's bidirectional image block,
        which a causal mask rebuilt from the padding alone would lose); else the batch's padding mask."""
        if isinstance(self.masks, dict) and all(isinstance(m, torch.Tensor) for m in self.masks.values()):
            return {kind: m[:, :, start:] for kind, m in self.masks.items()}  # (batch, 1, queries, keys)
        return self.attention_mask

    def _deepstack_from(self, start: int) -> dict:
        """Qwen3-VL's DeepStack features of the visual tokens at positions `start` on, for the replay."""
        mask, features = self.deepstack
        if mask is None or features is None:
            return {}
        order = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        order[mask] = torch.arange(int(mask.sum()), device=mask.device)  # row-major, as the features are stored
        kept = order[:, start:][mask[:, start:]]
        return {"visual_pos_masks": mask[:, start:], "deepstack_visual_embeds": [f[kept] for f in features]}

    @torch.no_grad()
    def answer_logits(self, block: torch.Tensor, layers: Iterable[int]) -> torch.Tensor:
        """The answer logits (batch, vocab) with `block`'s edges knocked out in `layers`, as
        `attention_knockout` + `readout.answer_logits` would give them."""
        layers = sorted(layers)
        queries = torch.as_tensor(block).any(-1).any(0).nonzero()
        if not layers or len(queries) == 0:
            return self.logits
        start = int(queries[0])
        language_model = self.adapter.language_model
        kwargs = {self.cache_argument: self._prefix_cache(start)}
        if self.positions is not None:  # the positions the model gave these tokens (M-RoPE), not recomputed ones
            kwargs["position_ids"] = self.positions[..., start:]
        kwargs.update(self._deepstack_from(start))
        with self._replayed(range(layers[0]), start), attention_knockout(self.adapter, block, layers):
            hidden = language_model(inputs_embeds=self.embeds[:, start:], attention_mask=self._mask_from(start),
                                    use_cache=True, **kwargs).last_hidden_state
        return self.adapter.unembedding(hidden[:, -1])
