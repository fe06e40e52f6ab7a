"""The named places where the book reads or changes a VLM, and the one way every intervention hooks them.

| site | layer | value | what it is |
| --- | --- | --- | --- |
| `"model_input"` | - | `input_ids` (batch, seq) | the prompt the whole VLM receives (where the image tokens are) |
| `"llm_input"` | - | `inputs_embeds` (batch, seq, d_model) | the sequence the LLM receives, visual tokens merged in |
| `"layer_input"` | d | (batch, seq, d_model) | what decoder layer d reads: depth d of the residual stream |
| `"layer_output"` | d | (batch, seq, d_model) | what decoder layer d writes: depth d + 1 |
| `"attention_mask"` | d | the mask layer d's attention gets | None, bool (True: may attend) or additive float |

Layers are decoder layers, 0 .. n_layers - 1. `hook(adapter, site, fn, layers)` calls `fn(layer, value, call)`
at the site in every forward pass within the block (`call`: the module's keyword arguments, for what else it was
given); a tensor returned replaces the value, a dict changes those keyword arguments, None leaves all as it is.
`skip=True` (layer outputs only) does not run the layer at all: `fn`'s return is its output. `capture` runs the
model only as far as a site and returns the value there. Ablation, knockout, the residual stream and the
knockout's replay all go through here.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable

import torch

SITES = ("model_input", "llm_input", "layer_input", "layer_output", "attention_mask")
_KWARG = {"model_input": "input_ids", "llm_input": "inputs_embeds", "layer_input": "hidden_states",
          "attention_mask": "attention_mask"}


def _module(adapter, site: str, layer: int | None):
    if site == "model_input":
        return adapter.model.base_model
    if site == "llm_input":
        return adapter.language_model
    if site == "attention_mask":
        return adapter.attention(layer)
    return adapter.layers[layer]


def _pre_hook(site: str, layer, fn):
    name = _KWARG[site]

    def hook(module, args, kwargs):
        positional = name not in kwargs and bool(args)  # layer inputs may come positionally
        value = args[0] if positional else kwargs.get(name)
        new = fn(layer, value, {"args": args, **kwargs})
        if new is None:
            return None
        if isinstance(new, dict):  # keyword arguments to change beside the value (Qwen3-VL's DeepStack)
            kwargs.update(new)
            return args, kwargs
        if positional:
            return (new, *args[1:]), kwargs
        kwargs[name] = new
        return args, kwargs
    return hook


@contextmanager
def _replaced_forward(module, forward):
    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # the class's forward again


@contextmanager
def hook(adapter, site: str, fn: Callable, layers: Iterable[int] | None = None, skip: bool = False):
    """Within the block, `fn(layer, value, call)` runs at `site` (of each of `layers`, for the per-layer sites)."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; the sites are {', '.join(SITES)}")
    per_layer = site in ("layer_input", "layer_output", "attention_mask")
    if per_layer == (layers is None):
        raise ValueError(f"site {site!r} " + ("needs `layers`" if per_layer else "takes no `layers`"))
    if skip and site != "layer_output":
        raise ValueError("skip=True replaces a layer's computation: only at 'layer_output'")
    with ExitStack() as stack:
        for layer in (layers if per_layer else [None]):
            module = _module(adapter, site, layer)
            if skip:
                forward = (lambda *args, _layer=layer, **kwargs: fn(_layer, None, kwargs))
                stack.enter_context(_replaced_forward(module, forward))
            elif site == "layer_output":
                def after(module, args, output, _layer=layer):
                    return fn(_layer, output, {})
                stack.callback(module.register_forward_hook(after).remove)
            else:
                handle = module.register_forward_pre_hook(_pre_hook(site, layer, fn), with_kwargs=True)
                stack.callback(handle.remove)
        yield


class _Reached(Exception):
    """Raised at the site `capture` waits for: nothing after it needs to run."""

    def __init__(self, value):
        self.value = value


@torch.no_grad()
def capture(adapter, site: str, batch: dict, layer: int | None = None, with_call: bool = False):
    """The value at `site` for `batch` (and the call's keyword arguments, `with_call`); the forward pass stops
    there (e.g. the visual tokens without running the LLM and its vocabulary-wide unembedding)."""
    def stop(layer, value, call):
        raise _Reached((value, call) if with_call else value)

    try:
        with hook(adapter, site, stop, None if layer is None else [layer]):
            adapter.model(**batch)
    except _Reached as reached:
        return reached.value
    raise RuntimeError(f"the forward pass never reached {site!r}")
