"""Real photos as items: a small labelled `datasets.Dataset` built here (boxes and masks) runs through chapter 1's
ablation and chapter 2's judge like the shapes world."""
import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlminterp_utils import lenses, localization as L, photos


def photo(boxes, size=(80, 60)):
    image = Image.new("RGB", size, (120, 160, 200))
    draw = ImageDraw.Draw(image)
    for x, y, w, h in boxes:
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(200, 60, 40))
    return image


@pytest.fixture
def dataset():
    mask = np.zeros((60, 80), bool)
    mask[10:40, 50:75] = True
    rows = {"image": [photo([(5, 5, 20, 30), (40, 30, 35, 25)]), photo([(50, 10, 25, 30)]), photo([])],
            "objects": [{"category": ["dog", "cat"], "bbox": [[5, 5, 20, 30], [40, 30, 35, 25]], "mask": [None, None]},
                        {"category": ["teddy bear"], "bbox": [None], "mask": [mask.tolist()]},
                        {"category": [], "bbox": [], "mask": []}]}
    return datasets.Dataset.from_dict(rows)


def test_rows_become_polling_examples_about_their_largest_object(dataset):
    examples = photos.examples_from_dataset(dataset)
    assert len(examples) == 2  # a row without objects is skipped
    first, second = examples
    assert first.question == "Is there a cat in the image?" and first.answer == "yes"  # 35 x 25 beats 20 x 30
    assert first.target_objects[0].mask.sum() == 35 * 25 and first.scene.objects[0].mask.sum() == 20 * 30
    assert second.target_objects[0].label == "teddy bear" and second.target_objects[0].words == ("teddy", "bear")
    assert second.target_objects[0].box == (50, 10, 75, 40)


def test_bad_columns_and_objects_get_clear_errors(dataset):
    with pytest.raises(ValueError, match="no column 'img'.*image=..."):
        photos.examples_from_dataset(dataset, image="img")
    broken = datasets.Dataset.from_dict({"image": [photo([])], "objects": [{"category": ["x"], "bbox": [None],
                                                                             "mask": [None]}]})
    with pytest.raises(ValueError, match="neither a 'mask' nor a 'bbox'"):
        photos.examples_from_dataset(broken)
    with pytest.raises(ValueError, match="'xywh' \\(COCO\\) or 'xyxy'"):
        photos.box_mask([0, 0, 1, 1], (4, 4), "cxcywh")


def test_photos_run_through_chapter_1_and_the_lens_judge(dataset, tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    examples = photos.examples_from_dataset(dataset)
    items = L.items_from_examples(examples)
    for it in items:  # a non-square photo goes through the processor's resize to the token grid
        tokens = adapter.object_tokens(it.object.mask)
        assert 0 < tokens.sum() < adapter.n_visual_tokens
    with pytest.warns(UserWarning):  # a random model answers nothing right
        result = L.ablation_flips(adapter, items, "polling", "object", buffer=0)
    assert result["n"] == 2
    readings = lenses.patch_readings(adapter, lenses.LogitLens(adapter), examples, k=3, layers=[0])
    share = lenses.interpretable_share(readings, examples, judge=lenses.names_scene_judge)
    assert 0 <= share.share.iloc[0] <= 1
