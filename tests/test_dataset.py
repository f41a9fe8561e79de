import os
import sys
import traceback
import types

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

import dataset
import synthetic_city
from conftest import window_offset
from dataset import (IGNORE_INDEX, ClassTable, DatasetError, SegmentationDataset, denormalize, has_cityscapes, paste,
                     prepare)
from runtime import one_line, parse_size, write_image_atomically
from visualize import colorize, legend_image, overlay, save_prediction_grid

EVAL_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
VOID_LABEL_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
# The seed dropped 6 rare classes of the 30 listed on cityscapes-dataset.com; any 24 names work the same.
SEED_CLASSES = ["road", "sidewalk", "parking", "building", "wall", "fence", "guard rail", "bridge", "pole",
                "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                "truck", "bus", "train", "motorcycle", "bicycle", "static", "dynamic"]


def CityscapesDataset(root, split="train", image_size=(512, 256), **options):
    return SegmentationDataset(root, split, image_size, layout="cityscapes", **options)


def png(path):
    return np.array(Image.open(path))


def expected_train_ids(mask_path):
    """Independent mapping through cityscapesscripts' label table."""
    label_ids = png(mask_path)
    return np.vectorize(lambda i: id2label[int(i)].trainId)(label_ids)


# --- class table -------------------------------------------------------------------------------------

def test_default_class_table_is_the_19_eval_classes():
    table = ClassTable.from_names()
    assert table.num_classes == 19
    assert table.label_ids == EVAL_LABEL_IDS
    assert table.names[:3] == ["road", "sidewalk", "building"] and table.names[-1] == "bicycle"
    assert table.colors.dtype == np.uint8 and table.colors.shape == (19, 3)
    assert table.colors[0].tolist() == [128, 64, 128] and table.colors[13].tolist() == [0, 0, 142]
    for train_id, label_id in enumerate(table.label_ids):
        assert id2label[label_id].trainId == train_id
        assert tuple(table.colors[train_id]) == id2label[label_id].color


def test_label_lut_sends_void_and_unknown_ids_to_ignore():
    lut = ClassTable.from_names().label_to_train
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert lut[VOID_LABEL_IDS].tolist() == [IGNORE_INDEX] * len(VOID_LABEL_IDS)
    assert (lut[34:] == IGNORE_INDEX).all()
    for label_id in range(34):
        assert lut[label_id] == id2label[label_id].trainId


def test_custom_class_list_follows_given_order():
    table = ClassTable.from_names(SEED_CLASSES)
    assert table.num_classes == 24 and table.names == SEED_CLASSES
    assert table.label_to_train[9] == 2  # parking: ignored by default, third class here
    assert table.label_to_train[11] == 3 and table.label_to_train[4] == 22
    assert table.label_to_train[1] == IGNORE_INDEX  # ego vehicle stays void
    assert (table.label_to_train != IGNORE_INDEX).sum() == 24
    assert table.colors[2].tolist() == [250, 170, 160]


@pytest.mark.parametrize("names", [["road", "roads"], ["license plate"]])
def test_unknown_class_name_lists_valid_names(names):
    with pytest.raises(ValueError, match=r"unknown Cityscapes class name.*valid names: unlabeled, .*bicycle"):
        ClassTable.from_names(names)


def test_duplicate_or_empty_class_list_is_rejected():
    for names in (["road", "road"], []):
        with pytest.raises(ValueError, match="without duplicates"):
            ClassTable.from_names(names)


# --- dataset -----------------------------------------------------------------------------------------

def test_samples_sorted_paired_by_stem_and_extra_files_ignored(make_cityscapes):
    root = make_cityscapes(counts={"train": 5, "val": 2})
    ds = CityscapesDataset(root, "train", image_size=(64, 32))
    stems = [image.name.removesuffix("_leftImg8bit.png") for image, _ in ds.samples]
    assert stems == ["aachen_000000_000019", "aachen_000001_000019", "aachen_000002_000019",
                     "bochum_000000_000019", "bochum_000001_000019"]
    for image_path, mask_path in ds.samples:
        assert mask_path.name == image_path.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        assert mask_path.parent.name == image_path.parent.name
    image, mask = ds[1]
    assert image.shape == (3, 32, 64) and image.dtype == torch.float32
    assert mask.shape == (32, 64) and mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), expected_train_ids(ds.samples[1][1]))
    np.testing.assert_array_equal(denormalize(image), png(ds.samples[1][0]))
    assert (mask[-4:] == IGNORE_INDEX).all()  # the ego-vehicle band is void


def test_normalisation_uses_imagenet_statistics(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "val", image_size=(64, 32))
    pixels = png(ds.samples[0][0]).astype(np.float32) / 255
    expected = (pixels - np.array(dataset.MEAN)) / np.array(dataset.STD)
    np.testing.assert_allclose(ds[0][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_custom_classes_map_masks(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32), classes=SEED_CLASSES)
    assert ds.class_table.num_classes == 24
    label_ids = png(ds.samples[0][1])
    expected = ClassTable.from_names(SEED_CLASSES).label_to_train[label_ids]
    np.testing.assert_array_equal(ds[0][1].numpy(), expected)


def test_train_id_files_give_the_same_masks(make_cityscapes):
    root = make_cityscapes(train_id_files=True)
    from_label_ids = CityscapesDataset(root, "train", image_size=(64, 32))
    from_train_ids = CityscapesDataset(root, "train", image_size=(64, 32), use_train_id_files=True)
    assert from_train_ids.samples[0][1].name.endswith("_gtFine_labelTrainIds.png")
    for index in range(len(from_label_ids)):
        assert torch.equal(from_label_ids[index][1], from_train_ids[index][1])
    with pytest.raises(DatasetError, match="default 19 classes"):
        CityscapesDataset(root, "train", classes=SEED_CLASSES, use_train_id_files=True)


def test_train_id_files_missing_is_an_error(make_cityscapes):
    with pytest.raises(DatasetError, match="aachen_000000_000019_gtFine_labelTrainIds.png: missing mask"):
        CityscapesDataset(make_cityscapes(), "train", use_train_id_files=True)


def test_resize_only_when_file_size_differs(make_cityscapes, monkeypatch):
    root = make_cityscapes(block=1)  # per-pixel labels, so the nearest-neighbour phase matters
    small = CityscapesDataset(root, "train", image_size=(32, 16))
    image, mask = small[0]
    assert image.shape == (3, 16, 32) and mask.shape == (16, 32)
    # Nearest with pixel centres picks source pixel 2i+1 when halving.
    np.testing.assert_array_equal(mask.numpy(), expected_train_ids(small.samples[0][1])[1::2, 1::2])
    pil_resized = np.array(Image.open(small.samples[0][0]).resize((32, 16), Image.BILINEAR)).astype(int)
    assert np.abs(denormalize(image).astype(int) - pil_resized).max() <= 1

    def no_resize(*args):
        raise AssertionError("resized a file that already has the training size")

    monkeypatch.setattr(dataset, "resize_image", no_resize)
    monkeypatch.setattr(dataset, "resize_mask", no_resize)
    assert CityscapesDataset(root, "train", image_size=(64, 32))[0][1].shape == (32, 64)


def test_no_augmentation_is_deterministic(make_cityscapes):
    root = make_cityscapes()
    first, second = CityscapesDataset(root, "val", image_size=(64, 32)), CityscapesDataset(root, "val", image_size=(64, 32))
    for index in range(len(first)):
        assert torch.equal(first[index][0], second[index][0]) and torch.equal(first[index][0], first[index][0])
        assert torch.equal(first[index][1], second[index][1])


def test_augmentation_keeps_image_and_mask_aligned(make_cityscapes, label_id_colors):
    """Image colours encode label ids, so after augmentation every pixel inside a uniform mask region
    must still show the colour of its class (jitter off; region borders are blended by bilinear)."""
    torch.manual_seed(0)
    ds = CityscapesDataset(make_cityscapes(block=8), "train", image_size=(64, 32), augment=True, color_jitter=0)
    label_ids = np.array(ds.class_table.label_ids)
    plain = CityscapesDataset(ds.root, "train", image_size=(64, 32))
    checked, changed = 0, 0
    for draw in range(12):
        image, mask = ds[draw % len(ds)]
        changed += not torch.equal(mask, plain[draw % len(ds)][1])
        image, mask = denormalize(image).astype(int), mask.numpy()
        padded = np.pad(mask.astype(int), 2, constant_values=-1)  # crop borders hide their neighbours
        windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
        interior = (windows == mask[..., None, None]).all(axis=(-1, -2)) & (mask != IGNORE_INDEX)
        expected = label_id_colors[label_ids[mask[interior]]].astype(int)
        assert np.abs(image[interior] - expected).max() <= 2
        checked += interior.sum()
    assert checked > 2000
    assert changed >= 10


def test_random_crop_pads_mask_with_ignore(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32), augment=True,
                           scale_range=(0.5, 0.5), hflip_prob=0, color_jitter=0)
    image, mask = ds[0]
    padding = (mask == IGNORE_INDEX).numpy()
    black = (denormalize(image) == 0).all(axis=-1)
    assert padding.sum() >= 64 * 32 * 3 // 4
    assert black.sum() == 64 * 32 * 3 // 4  # fixture colours are never black: only padding is
    assert padding[black].all()


def test_crop_size_takes_random_windows_of_the_image(make_cityscapes):
    root = make_cityscapes(block=4)
    plain_image, plain_mask = CityscapesDataset(root, "train", image_size=(64, 32))[0]
    cropped = CityscapesDataset(root, "train", image_size=(64, 32), augment=True, scale_range=(1.0, 1.0),
                                hflip_prob=0, color_jitter=0, crop_size=(24, 16))
    torch.manual_seed(0)
    offsets = set()
    for _ in range(8):
        image, mask = cropped[0]
        assert image.shape == (3, 16, 24) and mask.shape == (16, 24)
        offset = window_offset(mask, plain_mask)
        assert offset is not None and torch.equal(image, plain_image[:, offset[1]:offset[1] + 16, offset[0]:offset[0] + 24])
        offsets.add(offset)
    assert len(offsets) >= 4  # 41 x 17 windows to draw from


def test_color_jitter_changes_image_not_mask(make_cityscapes):
    root = make_cityscapes()
    torch.manual_seed(1)
    jittered = CityscapesDataset(root, "train", image_size=(64, 32), augment=True, scale_range=(1.0, 1.0),
                                 hflip_prob=0, color_jitter=0.4)[0]
    plain = CityscapesDataset(root, "train", image_size=(64, 32))[0]
    assert torch.equal(jittered[1], plain[1])
    assert not torch.allclose(jittered[0], plain[0])


def test_paste_by_hand_single_and_batched():
    image, mask = torch.zeros(3, 2, 3, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8)
    donor_image = torch.arange(100, 118, dtype=torch.uint8).view(3, 2, 3)
    donor_mask = torch.tensor([[1, 2, IGNORE_INDEX], [2, 0, 1]], dtype=torch.uint8)
    classes = torch.tensor([1, IGNORE_INDEX], dtype=torch.uint8)  # void is pasted only if asked for
    pasted_image, pasted_mask = paste(image, mask, donor_image, donor_mask, classes)
    assert pasted_mask.tolist() == [[1, 0, IGNORE_INDEX], [0, 0, 1]]
    assert pasted_image[0].tolist() == [[100, 0, 102], [0, 0, 105]]
    assert pasted_image[2].tolist() == [[112, 0, 114], [0, 0, 117]]
    mirrored_image, mirrored_mask = paste(image, mask, donor_image, donor_mask, classes[:1], mirrored=True)
    assert mirrored_mask.tolist() == [[0, 0, 1], [1, 0, 0]]  # the donor flipped left-right first
    assert mirrored_image[1].tolist() == [[0, 0, 106], [111, 0, 0]]
    batch = paste(torch.stack([image, image]), torch.stack([mask, mask]), torch.stack([donor_image, donor_image]),
                  torch.stack([donor_mask, donor_mask]), classes[:1], torch.tensor([False, True]))
    single = paste(image, mask, donor_image, donor_mask, classes[:1])
    assert torch.equal(batch[0][0], single[0]) and torch.equal(batch[1][0], single[1])
    assert torch.equal(batch[0][1], mirrored_image) and torch.equal(batch[1][1], mirrored_mask)


def test_copy_paste_puts_another_photos_class_pixels_where_they_lie(make_cityscapes):
    """Scale 1, no flip, no jitter: each item is its photo with some train photo's (possibly mirrored)
    pixels of the pasted classes on top, image and mask alike; donors and mirroring vary with the draw."""
    root = make_cityscapes(block=8)
    classes = tuple(range(0, 19, 2))
    options = dict(image_size=(64, 32), augment=True, scale_range=(1.0, 1.0), hflip_prob=0, color_jitter=0)
    pasting = CityscapesDataset(root, "train", paste_prob=1.0, paste_classes=classes, **options)
    sources = [pasting.read_sample(index) for index in range(len(pasting))]
    torch.manual_seed(0)
    donors_seen, changed = set(), 0
    for draw in range(16):
        index = draw % len(pasting)
        image, mask = pasting[index]
        candidates = {(donor, mirrored): paste(*sources[index], *sources[donor], torch.tensor(classes), mirrored)
                      for donor in range(len(pasting)) for mirrored in (False, True)}
        matches = [key for key, (_, pasted) in candidates.items() if torch.equal(mask, pasted.long())]
        assert matches, f"draw {draw}: not a paste of any train photo"
        expected_image = candidates[matches[0]][0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(denormalize(image).astype(int) - expected_image).max() <= 1
        changed += not torch.equal(mask, sources[index][1].long())
        donors_seen.update(matches if len(matches) == 1 else [])
        moved = mask != sources[index][1].long()
        assert np.isin(mask[moved].numpy(), classes).all()  # only the pasted classes arrive
    assert changed >= 12 and len({donor for donor, _ in donors_seen}) >= 2 and len({m for _, m in donors_seen}) == 2


def test_copy_paste_off_leaves_the_augmentation_draws_as_they_were(make_cityscapes):
    root = make_cityscapes(block=8)
    plain = CityscapesDataset(root, "train", image_size=(64, 32), augment=True)
    off = CityscapesDataset(root, "train", image_size=(64, 32), augment=True, paste_prob=0.0, paste_classes=(1, 2))
    no_classes = CityscapesDataset(root, "train", image_size=(64, 32), augment=True, paste_prob=1.0)
    for dataset_ in (off, no_classes):
        torch.manual_seed(5)
        expected = plain[1]
        torch.manual_seed(5)
        item = dataset_[1]
        assert torch.equal(item[0], expected[0]) and torch.equal(item[1], expected[1])
    with pytest.raises(ValueError, match=r"paste_prob must be in \[0, 1\], got 1.5"):
        CityscapesDataset(root, "train", image_size=(64, 32), augment=True, paste_prob=1.5, paste_classes=(1,))


def test_test_split_returns_images_only(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "test", image_size=(32, 16))
    assert len(ds) == 2 and not ds.has_labels
    assert all(mask is None for _, mask in ds.samples)
    item = ds[0]
    assert isinstance(item, torch.Tensor) and item.shape == (3, 16, 32)
    with pytest.raises(DatasetError, match="'test' has no labels"):
        CityscapesDataset(ds.root, "test", augment=True)


def test_has_cityscapes(make_cityscapes, tmp_path):
    root = make_cityscapes(counts={"train": 2, "val": 2})
    assert has_cityscapes(root)
    assert not has_cityscapes(tmp_path / "nowhere")
    assert not has_cityscapes(make_cityscapes("train_only", counts={"train": 2}))


# --- bad input ---------------------------------------------------------------------------------------

def assert_one_line(error_info, *fragments):
    message = str(error_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_image_without_mask_names_the_stem(make_cityscapes):
    root = make_cityscapes()
    (root / "gtFine/train/bochum/bochum_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError) as error_info:
        CityscapesDataset(root, "train")
    assert_one_line(error_info, "bochum_000001_000019", "missing mask")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_png_names_the_file(make_cityscapes, damage):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32))
    image_path = ds.samples[2][0]
    data = image_path.read_bytes()
    image_path.write_bytes({"garbage": b"not a png" * 20, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(DatasetError) as error_info:
        ds[2]
    assert_one_line(error_info, str(image_path), "cannot read PNG (")


def test_invalid_label_ids_name_the_file(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32))
    mask_path = ds.samples[0][1]
    label_ids = png(mask_path)
    label_ids[0, :3] = [34, 40, 255]
    Image.fromarray(label_ids).save(mask_path)
    with pytest.raises(DatasetError) as error_info:
        ds[0]
    assert_one_line(error_info, str(mask_path), "invalid mask values [34, 40, 255]", "label ids 0..33")


def test_rgb_mask_is_rejected(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32))
    mask_path = ds.samples[0][1]
    Image.fromarray(png(mask_path)).convert("RGB").save(mask_path)
    with pytest.raises(DatasetError) as error_info:
        ds[0]
    assert_one_line(error_info, str(mask_path), "single-channel 8-bit label PNG (mode L), got mode RGB")


def test_image_mask_size_mismatch_names_both(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32))
    mask_path = ds.samples[3][1]
    Image.fromarray(png(mask_path)[:16]).save(mask_path)
    with pytest.raises(DatasetError) as error_info:
        ds[3]
    assert_one_line(error_info, str(mask_path), "mask is 64x16", "bochum_000001_000019_leftImg8bit.png is 64x32")


def test_bad_roots_and_missing_splits(make_cityscapes, tmp_path):
    root = make_cityscapes()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "missing", "dataset root not found"),
        (empty, "not a Cityscapes root"),
    ]
    for bad_root, problem in cases:
        with pytest.raises(DatasetError) as error_info:
            CityscapesDataset(bad_root, "train")
        assert_one_line(error_info, str(bad_root), problem)
    with pytest.raises(DatasetError, match="unknown split 'training'"):
        CityscapesDataset(root, "training")
    for folder in ("gtFine/val", "leftImg8bit/val"):
        os.rename(root / folder, root / (folder + "_moved"))
        with pytest.raises(DatasetError) as error_info:
            CityscapesDataset(root, "val")
        assert_one_line(error_info, str(root / folder), "split folder missing")
    for stray in (root / "leftImg8bit/train").glob("*/*_leftImg8bit.png"):
        stray.unlink()
    with pytest.raises(DatasetError, match="no {city}/\\*_leftImg8bit.png images"):
        CityscapesDataset(root, "train")


def test_worker_error_carries_the_file_name(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32))
    broken = ds.samples[1][0]
    broken.write_bytes(b"\x89PNG broken")
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
    with pytest.raises(DatasetError, match=broken.name) as error_info:
        next(batches)
    assert "Traceback" in str(error_info.value)  # the worker's re-raise wraps the message ...
    assert one_line(error_info.value) == f"{broken}: cannot read PNG (not an image file)"  # ... one_line unwraps it
    # DataLoader's re-raise leaves a reference cycle through these frames; without breaking it the workers
    # are shut down by the garbage collector after their queues are closed, which waits 5 s.
    traceback.clear_frames(error_info.tb)
    del batches


def test_dataloader_batches(make_cityscapes):
    ds = CityscapesDataset(make_cityscapes(), "train", image_size=(64, 32), augment=True)
    images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 64) and masks.shape == (4, 32, 64) and masks.dtype == torch.int64


@pytest.mark.parametrize("text, size", [("512x256", (512, 256)), ("64X32", (64, 32)), (" 8 x 4 ", (8, 4))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["512", "0x256", "ax4", "512x256x3", "-5x4", ""])
def test_parse_size_rejects_bad_strings(text):
    with pytest.raises(ValueError, match=f"invalid size '{text}': expected WIDTHxHEIGHT"):
        parse_size(text)


def test_size_flag_error_says_what_is_wrong(capsys):
    with pytest.raises(SystemExit):
        synthetic_city.main(["--train", "1", "--val", "1", "--size", "0x3"])
    assert "invalid size '0x3': expected WIDTHxHEIGHT with positive integers" in capsys.readouterr().err


def test_one_line_keeps_plain_messages():
    assert one_line(ValueError("  a.png: broken \n")) == "a.png: broken"


def test_write_image_atomically_replaces_links_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"precious")
    link = tmp_path / "out" / "mask.png"
    link.parent.mkdir()
    link.symlink_to(target)
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_image_atomically(link, pixels)
    assert target.read_bytes() == b"precious" and not link.is_symlink()
    assert np.array_equal(png(link), pixels)
    with pytest.raises(KeyError):  # PIL's error for an unknown format: the save fails midway
        write_image_atomically(tmp_path / "out" / "x.png", pixels, image_format="NOPE")
    assert sorted(path.name for path in link.parent.iterdir()) == ["mask.png"]


# --- prepare -----------------------------------------------------------------------------------------

def prepared_files(root):
    return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())


def test_prepare_writes_downscaled_copy_and_is_idempotent(make_cityscapes, tmp_path):
    src = make_cityscapes(train_id_files=True, block=1)
    dst = tmp_path / "prepared"
    written, skipped = prepare(src, dst, (32, 16), workers=2)
    outputs = prepared_files(dst)
    assert (written, skipped) == (8 + 8 + 8, 0)  # images, labelIds and trainIds of 3 splits (4 + 2 + 2)
    assert len(outputs) == 24
    assert all(path.name.endswith(("_leftImg8bit.png", "_labelIds.png", "_labelTrainIds.png")) for path in outputs)
    for path in outputs:
        assert Image.open(dst / path).size == (32, 16)
        assert Image.open(dst / path).mode == Image.open(src / path).mode
        if "gtFine" in path.parts:
            np.testing.assert_array_equal(png(dst / path), png(src / path)[1::2, 1::2])

    mtimes = {path: (dst / path).stat().st_mtime_ns for path in outputs}
    assert prepare(src, dst, (32, 16), workers=1) == (0, 24)
    assert {path: (dst / path).stat().st_mtime_ns for path in outputs} == mtimes

    resumed = dst / outputs[0]
    resumed.unlink()
    dead_pid = 2**22 + 1  # above Linux's largest pid_max: a writer that cannot be running
    stale_temp = dst / outputs[1].parent / f".{outputs[1].name}.{dead_pid}.tmp"
    stale_temp.write_bytes(b"half a png")
    assert prepare(src, dst, (32, 16), workers=1) == (1, 23)
    assert prepared_files(dst) == outputs  # no temp files left

    from_raw = CityscapesDataset(src, "val", image_size=(32, 16))
    from_prepared = CityscapesDataset(dst, "val", image_size=(32, 16))
    for index in range(len(from_raw)):
        assert torch.equal(from_raw[index][0], from_prepared[index][0])
        assert torch.equal(from_raw[index][1], from_prepared[index][1])


def test_prepare_never_overwrites(make_cityscapes, tmp_path):
    src = make_cityscapes()
    for dst in (src, src / "prepared"):
        with pytest.raises(DatasetError, match="must lie outside the source"):
            prepare(src, dst, (32, 16), workers=1)
    dst = tmp_path / "prepared"
    prepare(src, dst, (32, 16), workers=1)
    with pytest.raises(DatasetError, match="already exists with size 32x16, not 16x8"):
        prepare(src, dst, (16, 8), workers=1)
    with pytest.raises(DatasetError, match="nowhere: source root not found"):
        prepare(tmp_path / "nowhere", tmp_path / "out", (32, 16), workers=1)
    with pytest.raises(DatasetError, match="not a Cityscapes root"):
        prepare(tmp_path / "prepared" / "gtFine", tmp_path / "out", (32, 16), workers=1, layout="cityscapes")
    with pytest.raises(DatasetError, match="gtFine: no dataset here"):
        prepare(tmp_path / "prepared" / "gtFine", tmp_path / "out", (32, 16), workers=1)


def test_prepare_reports_corrupt_file_from_worker(make_cityscapes, tmp_path):
    src = make_cityscapes()
    broken = src / "leftImg8bit/val/bochum/bochum_000000_000019_leftImg8bit.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=f"{broken}: cannot read PNG"):
        prepare(src, tmp_path / "prepared", (32, 16), workers=2)


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli_prepare_and_errors(make_cityscapes, tmp_path, capsys):
    src = make_cityscapes(counts={"train": 2, "val": 2})
    dataset.main(["prepare", "--src", str(src), "--dst", str(tmp_path / "out"), "--size", "32x16", "--workers", "1"])
    assert "wrote 8 files, skipped 0" in capsys.readouterr().out
    assert dataset.main(["prepare", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: source root not found\n"
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["prepare", "--src", str(src), "--dst", str(tmp_path / "x"), "--size", "big"])
    assert exit_info.value.code == 2


def test_cli_synth_writes_a_dataset_this_module_reads(tmp_path, capsys):
    assert synthetic_city.main(["--out", str(tmp_path / "city"), "--train", "2", "--val", "1", "--size", "64x32",
                                "--workers", "1"]) == 0
    assert "2 train, 1 val" in capsys.readouterr().out
    images, masks = zip(*CityscapesDataset(tmp_path / "city", "train", image_size=(64, 32)))
    assert len(images) == 2 and masks[0].shape == (32, 64) and (masks[0] == IGNORE_INDEX).any()  # ego band


# --- visualisation -----------------------------------------------------------------------------------

def test_colorize_and_overlay_by_hand():
    colors = ClassTable.from_names().colors
    mask = torch.tensor([[0, 13], [255, 18]])
    assert colorize(mask, colors).tolist() == [[[128, 64, 128], [0, 0, 142]], [[0, 0, 0], [119, 11, 32]]]
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, mask, colors, alpha=0.5)
    assert blended.dtype == np.uint8
    assert blended.tolist() == [[[114, 82, 114], [50, 50, 121]], [[100, 100, 100], [110, 56, 66]]]


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.3, 1.0])
def test_overlay_equals_float_blending_rounded_half_to_even(alpha):
    """Against the plain float blend: exact for alphas in 1/256ths, within 1 otherwise; ignored pixels keep the
    image, ids without a colour blend with black, for uint8 and int64 masks alike."""
    rng = np.random.default_rng(3)
    colors = rng.integers(0, 256, (19, 3))
    image = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    mask = rng.integers(0, 25, (31, 45))
    mask[:4] = IGNORE_INDEX
    weight = round(alpha * 256) / 256
    palette = np.zeros((256, 3))
    palette[:19] = colors
    expected = np.round(image * (1 - weight) + palette[mask] * weight)
    expected[mask == IGNORE_INDEX] = image[mask == IGNORE_INDEX]
    for labels in (mask, mask.astype(np.uint8), torch.from_numpy(mask)):
        blended = overlay(image, labels, colors, alpha)
        assert blended.dtype == np.uint8 and blended.shape == image.shape
        np.testing.assert_array_equal(blended, expected)


def test_legend_image_rows_carry_class_colours():
    table = ClassTable.from_names()
    legend = legend_image(table)
    assert legend.shape == (19 * 20, 200, 3) and legend.dtype == np.uint8
    for train_id in (0, 10, 18):
        assert legend[train_id * 20 + 10, 10].tolist() == table.colors[train_id].tolist()


def test_save_prediction_grid_draws_masks(tmp_path):
    table = ClassTable.from_names()
    images = [np.full((32, 64, 3), 255, dtype=np.uint8)] * 2
    gt = [np.zeros((32, 64), dtype=np.int64)] * 2  # road everywhere
    pred = [np.full((32, 64), 10, dtype=np.int64), torch.full((32, 64), IGNORE_INDEX)]  # sky, ignored
    path = tmp_path / "grid.png"
    save_prediction_grid(path, images, gt, pred, table)
    picture = np.array(Image.open(path).convert("RGB"))
    assert picture.shape[0] > 200 and picture.shape[1] == 900
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert (128, 64, 128) in colours and (70, 130, 180) in colours
    with pytest.raises(ValueError, match="equally many"):
        save_prediction_grid(path, images, gt, pred[:1], table)
