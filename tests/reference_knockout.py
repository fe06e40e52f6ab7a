"""A from-scratch attention that masks blocked scores with -inf: the reference the knockout is tested against.

It lives with the tests because nothing but the tests needs it; the chapters use
`vlminterp_utils.interventions.attention_knockout`.
"""
from typing import Iterable

import torch

from vlminterp_utils.core.readout import answer_logits


def reference_knockout_logits(adapter, batch: dict, block: torch.Tensor, layers: Iterable[int],
                              image_block: bool = False) -> torch.Tensor:
    """Answer logits from a from-scratch attention that masks blocked scores with -inf: the knockout's reference.

    Its causal and padding masks are rebuilt here from positions and the batch's attention mask, independently
    of what the model passes around; `image_block` lets the image tokens of a sequence attend to each other both
    ways (Gemma 3, one image per prompt).
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    layers, pad = set(layers), batch["attention_mask"].bool()

    def reference(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        n_q, n_k = query.shape[2], key.shape[2]
        k, v = (repeat_kv(t, module.num_key_value_groups) for t in (key, value))
        scores = (query @ k.transpose(2, 3)) * scaling
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)[None] & pad[:, None, -n_k:]
        if image_block:
            image = batch["input_ids"] == adapter.image_token_id
            allowed |= image[:, -n_q:, None] & image[:, None, -n_k:]
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

