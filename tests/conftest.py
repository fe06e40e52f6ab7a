"""Shared fixtures: a tiny random Llava (built here, no hub) and the embedded shapes-llava; the order of the run."""
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from schedule import LONG_S, balanced_order
from tiny_models import build_tiny_llava
from vlminterp_utils import models
from vlminterp_utils.core.storage import write_text

DURATIONS = Path(__file__).with_name("durations.json")

# Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_addoption(parser):
    parser.addoption("--record-durations", metavar="PATH",
                     help="write every test's seconds (setup + call + teardown) to PATH as JSON; "
                          "tests/durations.json orders the tests of later runs under pytest-xdist")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the long tests first and balanced between the workers (`schedule.py`). A test marked
    `phenomenon` or `slow` that `tests/durations.json` does not know yet counts as long."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    for item in items:
        if item.nodeid not in seconds and (item.get_closest_marker("phenomenon") or item.get_closest_marker("slow")):
            seconds[item.nodeid] = LONG_S
    items[:] = [items[i] for i in balanced_order([item.nodeid for item in items], seconds, workers)]


_seconds = defaultdict(float)


def pytest_runtest_logreport(report):
    _seconds[report.nodeid] += report.duration  # on the controller too: workers send their reports there


def pytest_sessionfinish(session):
    path = session.config.getoption("--record-durations")
    if path and not hasattr(session.config, "workerinput") and _seconds:  # once, by the controller
        write_text(path, json.dumps({k: round(v, 1) for k, v in sorted(_seconds.items())}, indent=0) + "\n")


@pytest.fixture(scope="session")
def smol_tokenizer():
    return models.smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llava saved with save_pretrained, so loading goes through `load_vlm` like a hub checkpoint."""
    model, processor = build_tiny_llava(tokenizer=smol_tokenizer)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_llava_dir):
    return models.load_vlm(str(tiny_llava_dir))


@pytest.fixture(scope="session")
def shapes_llava():
    return models.load_vlm("shapes-llava")


@pytest.fixture(scope="session", params=["eager", "sdpa"])
def tiny_any_attention(request, smol_tokenizer):
    """The same tiny random Llava under each attention implementation the knockout must handle."""
    model, processor = build_tiny_llava(tokenizer=smol_tokenizer, attn_implementation=request.param)
    return model, processor, models.adapter_for(model, processor)


class GridAdapter(models.VLMAdapter):
    """An adapter without a model: shapes-llava's geometry (64 px, an 8 x 8 grid of 8 px patches)."""

    def token_regions(self, image_size):
        from vlminterp_utils.core import geometry
        return geometry.patch_boxes(8, 8, image_size[0] / 8)


@pytest.fixture
def grid_adapter():
    return GridAdapter(None, None)
