"""The named hook sites every intervention goes through (`core.sites`)."""
import pytest
import torch

from vlminterp_utils import shapes
from vlminterp_utils.core import readout, sites


def batch_of(adapter, n=2):
    exs = [shapes.example(0, i, "caption", size=adapter.image_size) for i in range(n)]
    return adapter.inputs([e.scene.image for e in exs], ["Hi", "Describe the image."][:n])


def test_every_site_is_reached_in_order_and_left_clean(tiny):
    """One forward pass visits the sites in the order the model runs them; after the block no hook is left."""
    _, _, adapter = tiny
    batch, seen = batch_of(adapter), []
    layers = range(adapter.n_layers)

    def hooks():  # transformers installs hooks of its own at the first forward pass: count after one
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())
    with torch.no_grad():
        adapter.model(**batch, logits_to_keep=1)
    before = hooks()

    def note(site):
        return lambda layer, value, call: seen.append((site, layer, tuple(value.shape) if value is not None
                                                       else None))
    with torch.no_grad(), sites.hook(adapter, "model_input", note("model_input")), \
            sites.hook(adapter, "llm_input", note("llm_input")), \
            sites.hook(adapter, "layer_input", note("layer_input"), layers), \
            sites.hook(adapter, "attention_mask", note("attention_mask"), layers), \
            sites.hook(adapter, "layer_output", note("layer_output"), layers):
        adapter.model(**batch, logits_to_keep=1)
    names = [s for s, _, _ in seen]
    assert names[:3] == ["model_input", "llm_input", "layer_input"]
    assert names[3:6] == ["attention_mask", "layer_output", "layer_input"]
    assert [layer for s, layer, _ in seen if s == "layer_output"] == list(layers)
    assert hooks() == before


def test_a_returned_value_replaces_the_sites_and_skip_replaces_the_layer(tiny):
    """Zeroing layer 0's output equals skipping layer 0 with a zero output; both change the logits."""
    _, _, adapter = tiny
    batch = batch_of(adapter)
    with torch.no_grad():
        clean = readout.answer_logits(adapter, batch)
        with sites.hook(adapter, "layer_output", lambda layer, h, call: torch.zeros_like(h), [0]):
            zeroed = readout.answer_logits(adapter, batch)
        shape = (*batch["input_ids"].shape, adapter.text_config.hidden_size)
        with sites.hook(adapter, "layer_output", lambda layer, h, call: torch.zeros(shape), [0], skip=True):
            skipped = readout.answer_logits(adapter, batch)
        again = readout.answer_logits(adapter, batch)
    assert torch.allclose(zeroed, skipped) and not torch.allclose(zeroed, clean)
    assert torch.equal(again, clean)  # the layer's own forward is back


def test_capture_stops_at_the_site_and_bad_requests_say_what_is_wrong(tiny):
    _, _, adapter = tiny
    batch = batch_of(adapter)
    with torch.no_grad(), readout.record_residual_stream(adapter) as stream:
        adapter.model(**batch, logits_to_keep=1)
    assert torch.equal(sites.capture(adapter, "layer_input", batch, layer=1), stream[1])
    with pytest.raises(ValueError, match="unknown site 'residual'"):
        with sites.hook(adapter, "residual", print):
            pass
    with pytest.raises(ValueError, match="needs `layers`"):
        with sites.hook(adapter, "layer_output", print):
            pass
    with pytest.raises(ValueError, match="only at 'layer_output'"):
        with sites.hook(adapter, "attention_mask", print, [0], skip=True):
            pass
