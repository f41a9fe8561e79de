"""Tests for synthetic_city.py: official layout (checked with torchvision's own Cityscapes reader),
label ids, determinism across seeds and worker counts, idempotence, and the colour-only baseline."""
import json
import re

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import Cityscapes

import synthetic_city
from bench.colour_baseline import colour_baseline_miou
from dataset import CityscapesLayout

SIZE = (128, 64)
COUNTS = dict(num_train=6, num_val=3, num_test=2)
STEM = re.compile(r"^(?P<city>[a-z]+)_(?P<seq>\d{6})_(?P<frame>\d{6})$")
OFFICIAL_IDS = {c.id for c in Cityscapes.classes if c.id >= 0}
ID_BY_NAME = {c.name: c.id for c in Cityscapes.classes}
OFFICIAL_COLORS = {c.id: c.color for c in Cityscapes.classes if c.id >= 0}
EVALUATED = ("road", "sidewalk", "building", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
             "sky", "person", "car")


def read(path):
    return np.asarray(Image.open(path))


def all_files(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "city"
    assert synthetic_city.generate(root, size=SIZE, seed=0, workers=1, **COUNTS) == 11
    return root


def test_layout_and_names_are_the_official_ones(city):
    for split, count in (("train", 6), ("val", 3), ("test", 2)):
        images = sorted((city / "leftImg8bit" / split).glob("*/*"))
        assert len(images) == count
        assert {path.parent.name for path in images} == set(synthetic_city.SPLIT_CITIES[split])
        for image in images:
            stem = STEM.match(image.name.removesuffix("_leftImg8bit.png"))
            assert stem and image.name.endswith("_leftImg8bit.png") and stem["city"] == image.parent.name
            assert stem["frame"] == "000019"
            masks = sorted(path.name for path in (city / "gtFine" / split / image.parent.name).glob(f"{stem[0]}_*"))
            assert masks == [f"{stem[0]}_gtFine_color.png", f"{stem[0]}_gtFine_labelIds.png"]
    assert set(synthetic_city.SPLIT_CITIES["train"]).isdisjoint(synthetic_city.SPLIT_CITIES["val"])
    assert json.loads((city / "synthetic.json").read_text())["size"] == list(SIZE)
    assert not list(city.rglob("*.tmp"))


def test_torchvision_cityscapes_reads_it(city):
    """torchvision's own reader (an independent parser of the official layout) finds every pair."""
    reference = Cityscapes(str(city), split="train", mode="fine", target_type=["semantic", "color"])
    assert len(reference) == 6 == len(CityscapesLayout(city).samples("train"))
    for image, (semantic, color) in reference:
        assert image.size == SIZE and semantic.size == SIZE
        label_ids = np.asarray(semantic)
        color = np.asarray(color)
        assert color.shape[-1] == 4 and (color[..., 3] == 255).all()  # RGBA, like the release
        for label_id in np.unique(label_ids):
            assert (color[label_ids == label_id, :3] == OFFICIAL_COLORS[label_id]).all()


def test_label_ids_are_cityscapes_ids_and_every_class_appears(city):
    found = set()
    for split in ("train", "val"):
        for path in (city / "gtFine" / split).glob("*/*_labelIds.png"):
            label_ids = read(path)
            assert label_ids.dtype == np.uint8 and label_ids.shape == SIZE[::-1]
            assert set(np.unique(label_ids).tolist()) <= OFFICIAL_IDS
            found |= set(np.unique(label_ids).tolist())
    assert {ID_BY_NAME[name] for name in EVALUATED} <= found


def test_ego_vehicle_band_is_void_at_the_bottom(city):
    for path in (city / "gtFine" / "train").glob("*/*_labelIds.png"):
        label_ids = read(path)
        ego = label_ids == ID_BY_NAME["ego vehicle"]
        assert ego[-1].all()  # the whole bottom row
        rows = np.flatnonzero(ego.any(1))
        assert rows.min() > SIZE[1] * 0.8 and np.array_equal(rows, np.arange(rows.min(), SIZE[1]))


def test_test_split_has_images_and_placeholder_labels(city):
    for path in (city / "gtFine" / "test").glob("*/*_labelIds.png"):
        assert not read(path).any()
    images = [read(path) for path in (city / "leftImg8bit" / "test").glob("*/*.png")]
    assert len(images) == 2 and all(image.shape == (SIZE[1], SIZE[0], 3) and image.std() > 10 for image in images)


def test_render_scene_is_deterministic_per_seed():
    first = synthetic_city.render_scene(np.random.default_rng(5), 96, 48)
    again = synthetic_city.render_scene(np.random.default_rng(5), 96, 48)
    other = synthetic_city.render_scene(np.random.default_rng(6), 96, 48)
    assert first[0].shape == (48, 96, 3) and first[0].dtype == np.uint8
    assert first[1].shape == (48, 96) and first[1].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


def test_files_do_not_depend_on_workers_but_on_seed(tmp_path, city):
    synthetic_city.generate(tmp_path / "two_workers", size=SIZE, seed=0, workers=2, **COUNTS)
    synthetic_city.generate(tmp_path / "seed1", size=SIZE, seed=1, workers=1, **COUNTS)
    reference = all_files(city)
    assert all_files(tmp_path / "two_workers") == reference
    other_seed = all_files(tmp_path / "seed1")
    assert other_seed.keys() == reference.keys()
    assert all(other_seed[name] != reference[name] for name in reference if name.endswith("_leftImg8bit.png"))


def test_rerun_skips_existing_files_and_resumes(tmp_path):
    root = tmp_path / "city"
    assert synthetic_city.generate(root, 3, 1, size=(64, 32), workers=1) == 4
    before = all_files(root)
    victim = next((root / "gtFine" / "val").glob("*/*_labelIds.png"))
    victim.unlink()
    assert synthetic_city.generate(root, 3, 1, size=(64, 32), workers=1) == 1
    assert all_files(root) == before


def test_mismatched_arguments_or_foreign_folder_are_refused(tmp_path):
    root = tmp_path / "city"
    synthetic_city.generate(root, 2, 1, size=(64, 32), workers=1)
    assert synthetic_city.read_settings(root) == {
        "generator": "synthetic_city", "format_version": synthetic_city.FORMAT_VERSION, "size": [64, 32], "seed": 0,
        "num_train": 2, "num_val": 1, "num_test": 0} == synthetic_city.settings_for(2, 1, size=(64, 32))
    assert synthetic_city.read_settings(tmp_path / "nothing") is None
    before = all_files(root)
    for kwargs in (dict(size=(64, 32), seed=1), dict(size=(96, 48)), dict(size=(64, 32), num_test=1)):
        with pytest.raises(ValueError, match=r"synthetic\.json.*another output folder"):
            synthetic_city.generate(root, 2, 1, workers=1, **kwargs)
    assert all_files(root) == before
    foreign = tmp_path / "real"
    (foreign / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="not made by synthetic_city.py"):
        synthetic_city.generate(foreign, 2, 1, size=(64, 32), workers=1)
    assert not (foreign / "synthetic.json").exists()
    with pytest.raises(ValueError, match="integer >= 0"):
        synthetic_city.generate(tmp_path / "bad", -1, 1)


def test_colour_alone_does_not_solve_it(tmp_path):
    """Nearest-class-mean RGB classifier, fitted on train: issue 3 requires <= 0.45 val mIoU."""
    synthetic_city.generate(tmp_path / "city", 20, 10, size=(256, 128), seed=0)
    miou = colour_baseline_miou(tmp_path / "city")
    assert 0.02 < miou <= 0.45
