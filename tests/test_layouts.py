"""Your own data (the folder layout) and CamVid as distributed, through dataset.py, training.py and inference.py:
index and colour masks, void, classes.txt, every bad input as one line naming the file, and the class table
carried from the data to the checkpoint to the masks inference writes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import inference
import training
from conftest import CAMVID_COLORS, FOLDER_CLASSES
from dataset import (IGNORE_INDEX, DatasetError, FolderLayout, SegmentationDataset, default_palette, detect_layout,
                     open_layout, prepare)
from metrics import ConfusionMatrix

TINY = ["--base_channels", "4", "--depth", "2", "--batch_size", "2", "--accum_steps", "1", "--warmup_steps", "1",
        "--log_interval", "1", "--num_workers", "0", "--device", "cpu", "--training_iterations", "2",
        "--eval_interval", "2"]


def png(path):
    return np.array(Image.open(path))


def expected_labels(mask_path):
    """Class indices of a fixture mask, decoded by hand: L and P masks hold them, RGB masks the classes' colours
    (0 0 0 = void)."""
    with Image.open(mask_path) as mask:
        if mask.mode in ("L", "P"):
            return np.array(mask)
        pixels = np.array(mask.convert("RGB"))
    labels = np.full(pixels.shape[:2], IGNORE_INDEX, np.uint8)
    for index, (_, color) in enumerate(FOLDER_CLASSES):
        labels[(pixels == color).all(-1)] = index
    return labels


def assert_one_line(error_info, *fragments):
    message = str(error_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- the folder layout --------------------------------------------------------------------------------

def test_folder_layout_reads_png_and_jpg_photos_with_index_palette_and_colour_masks(make_folder_dataset):
    root = make_folder_dataset(counts={"train": 6, "val": 3})
    assert detect_layout(root) == "folder"
    ds = SegmentationDataset(root, "train", image_size=(32, 16))
    assert ds.class_table.names == ["road", "traffic cone", "sky", "car"]
    assert ds.class_table.colors.tolist() == [list(color) for _, color in FOLDER_CLASSES]
    assert {path.suffix for path, _ in ds.samples} == {".png", ".jpg"}
    assert {Image.open(mask).mode for _, mask in ds.samples} == {"L", "P", "RGB"}
    for index, (_, mask_path) in enumerate(ds.samples):
        labels = expected_labels(mask_path)
        assert (labels == IGNORE_INDEX).any() and (labels < 4).any()  # void and classes in every mask
        np.testing.assert_array_equal(ds[index][1].numpy(), labels)
    val = SegmentationDataset(root, "val", image_size=(32, 16))
    assert not any((val[i][1] == 3).any() for i in range(len(val)))  # the last class never appears in val


def test_classes_txt_names_with_spaces_comments_optional_colours_and_void(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# name [R G B]\n\nroad 128 64 128\ntraffic cone\n  big  truck  0 0 70 # comment\nvoid 1 2 3\n"
                    "pole\n")
    names, colors, void = FolderLayout.read_classes(path)
    assert names == ["road", "traffic cone", "big truck", "pole"] and void == (1, 2, 3)
    assert colors[0] == (128, 64, 128) and colors[2] == (0, 0, 70)
    assert colors[1] == default_palette(2, avoid=[(128, 64, 128), (0, 0, 70), (1, 2, 3)])[0]
    assert len(set(colors) | {void}) == 5  # default colours differ from the given ones and from each other
    for text, problem in (("road\nroad\n", "class 'road' is listed twice"), ("# nothing\n", "no classes"),
                          ("road 1 2 3\nsky 1 2 3\n", "colour (1, 2, 3) is given to two entries"),
                          ("road 300 0 0\n", "line 1: colour (300, 0, 0) is not R G B"),
                          ("sky 70 130\n", "line 1: 'sky 70 130': expected a class name, then optionally its colour")):
        path.write_text(text)
        with pytest.raises(DatasetError) as error_info:
            FolderLayout.read_classes(path)
        assert_one_line(error_info, str(path), problem)


def folder_error(root, split="train"):
    with pytest.raises(DatasetError) as error_info:
        dataset = SegmentationDataset(root, split, image_size=(32, 16))
        for index in range(len(dataset)):
            dataset[index]
    return error_info


@pytest.mark.parametrize("damage", ["no mask", "same name", "bad value", "bad colour", "size", "unreadable",
                                    "no classes.txt", "no split"])
def test_every_bad_folder_input_is_one_line_naming_the_file(make_folder_dataset, damage):
    root = make_folder_dataset(mask_modes=("L", "RGB"))
    images, masks = root / "images" / "train", root / "masks" / "train"
    if damage == "no mask":
        (masks / "frame 1.png").unlink()
        assert_one_line(folder_error(root), str(masks / "frame 1.png"), "missing mask for image frame 1.jpg")
    elif damage == "same name":
        Image.open(images / "frame 1.jpg").save(images / "frame 1.png")
        assert_one_line(folder_error(root), "frame 1.png", "two images named frame 1 (frame 1.jpg and frame 1.png)")
    elif damage == "bad value":
        labels = png(masks / "frame 0.png")
        labels[0, :3] = [4, 9, 9]
        Image.fromarray(labels).save(masks / "frame 0.png")
        assert_one_line(folder_error(root), str(masks / "frame 0.png"), "invalid mask values [4, 9]",
                        "class indices 0..3 or 255 (void)")
    elif damage == "bad colour":
        pixels = png(masks / "frame 1.png")
        pixels[0, 0], pixels[0, 1], pixels[1, 0], pixels[1, 1] = (1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)
        Image.fromarray(pixels).save(masks / "frame 1.png")
        assert_one_line(folder_error(root), str(masks / "frame 1.png"),
                        "colours not in classes.txt: (1, 2, 3), (4, 5, 6), (7, 8, 9) ...")
    elif damage == "size":
        Image.fromarray(png(masks / "frame 0.png")[:8]).save(masks / "frame 0.png")
        assert_one_line(folder_error(root), str(masks / "frame 0.png"), "mask is 32x8 but image frame 0.png is 32x16")
    elif damage == "unreadable":
        (images / "frame 2.png").write_bytes(b"not a png")
        assert_one_line(folder_error(root), str(images / "frame 2.png"), "cannot read PNG (not an image file)")
    elif damage == "no classes.txt":
        (root / "classes.txt").unlink()
        assert_one_line(folder_error(root), str(root / "classes.txt"), "missing")
    else:
        (masks / "frame 0.png").rename(root / "frame 0.png")
        for path in masks.iterdir():
            path.unlink()
        masks.rmdir()
        assert_one_line(folder_error(root), str(masks), "split folder missing")


def test_a_mask_without_its_image_is_a_warning(make_folder_dataset, capsys):
    root = make_folder_dataset()
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "masks" / "train" / "orphan.png")
    assert len(SegmentationDataset(root, "train", image_size=(32, 16))) == 4
    assert capsys.readouterr().err.strip() == (f"warning: {root / 'masks' / 'train' / 'orphan.png'}: no image named "
                                               f"orphan in {root / 'images' / 'train'}; mask ignored")


def test_test_split_without_masks_is_unlabelled(make_folder_dataset):
    root = make_folder_dataset(counts={"train": 2, "val": 1, "test": 2})
    for path in (root / "masks" / "test").iterdir():
        path.unlink()
    (root / "masks" / "test").rmdir()
    test = SegmentationDataset(root, "test", image_size=(32, 16))
    assert not test.has_labels and test[0].shape == (3, 16, 32)


# --- CamVid as distributed ----------------------------------------------------------------------------

def test_camvid_reads_the_segnet_folder_as_it_is(make_camvid):
    root = make_camvid()
    assert detect_layout(root) == "camvid"
    ds = SegmentationDataset(root, "train", image_size=(48, 36))
    assert ds.class_table.names == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                                    "Car", "Pedestrian", "Bicyclist"]
    assert ds.class_table.colors.tolist() == [list(color) for color in CAMVID_COLORS]
    assert [path.name for path, _ in ds.samples] == ["0001TP_006690.png", "0001TP_006720.png", "0001TP_006750.png",
                                                     "0001TP_006780.png"]
    for index, (_, mask_path) in enumerate(ds.samples):
        raw = png(mask_path)
        expected = np.where(raw == 11, IGNORE_INDEX, raw)
        assert (raw == 11).any()
        np.testing.assert_array_equal(ds[index][1].numpy(), expected)
    subset = SegmentationDataset(root, "train", image_size=(48, 36), classes=["Road", "Car", "Sky"])
    raw = png(subset.samples[0][1])
    expected = np.select([raw == 3, raw == 8, raw == 0], [0, 1, 2], IGNORE_INDEX)
    np.testing.assert_array_equal(subset[0][1].numpy(), expected)
    with pytest.raises(DatasetError, match="unknown CamVid class name"):
        SegmentationDataset(root, "train", classes=["Road", "road"])


def test_camvid_bad_values_and_missing_folders(make_camvid):
    root = make_camvid()
    mask_path = sorted((root / "valannot").iterdir())[0]
    labels = png(mask_path)
    labels[0, 0] = 12
    Image.fromarray(labels).save(mask_path)
    with pytest.raises(DatasetError) as error_info:
        SegmentationDataset(root, "val", image_size=(48, 36))[0]
    assert_one_line(error_info, str(mask_path), "invalid mask values [12]", "0..10 or 11 (void)")
    with pytest.raises(DatasetError) as error_info:
        SegmentationDataset(root, "test")
    assert_one_line(error_info, str(root / "test"), "split folder missing")


# --- prepare --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "camvid"])
def test_prepare_writes_the_same_layout_downscaled(make_folder_dataset, make_camvid, tmp_path, kind):
    src = make_folder_dataset(size=(64, 32)) if kind == "folder" else make_camvid(size=(64, 32))
    dst = tmp_path / "prepared"
    written, skipped = prepare(src, dst, (32, 16), workers=1)
    assert (written, skipped) == (14, 0) if kind == "folder" else (12, 0)
    assert detect_layout(dst) == kind
    raw, small = SegmentationDataset(src, "val", (32, 16)), SegmentationDataset(dst, "val", (32, 16))
    assert small.class_table.names == raw.class_table.names
    for (src_image, src_mask), (dst_image, dst_mask) in zip(raw.samples, small.samples):
        assert dst_image.name == src_image.name and Image.open(dst_mask).mode == Image.open(src_mask).mode
        assert Image.open(dst_image).size == Image.open(dst_mask).size == (32, 16)
        # masks nearest (no invented label or colour); the dataset reads the same class ids either way
    for index in range(len(raw)):
        assert torch.equal(raw[index][1], small[index][1])
    assert prepare(src, dst, (32, 16), workers=1)[0] == 0


# --- through training and inference -------------------------------------------------------------------

def train(root, run_dir, *extra):
    training.main(["--data_root", str(root), "--out_dir", str(run_dir), "--model_path", str(run_dir / "model.pth"),
                   *TINY, *extra])
    return run_dir / "model.pth"


def mask_file_miou(mask_folder, dataset):
    """mIoU of the NAME_mask.png files inference.py wrote, against the split's labels (an independent count)."""
    confusion = ConfusionMatrix(dataset.class_table.num_classes)
    for image_path, mask_path in dataset.samples:
        predicted = torch.from_numpy(png(mask_folder / f"{image_path.stem}_mask.png").astype(np.int64))
        target = dataset.read_train_ids(mask_path, predicted.shape[::-1], image_path).long()
        confusion.update(predicted, target)
    return confusion.compute()["miou"]


@pytest.mark.parametrize("kind", ["folder", "camvid"])
@pytest.mark.slow
def test_train_segment_and_evaluate_follow_the_data_class_table(make_folder_dataset, make_camvid, tmp_path, capsys,
                                                                kind):
    """The checkpoint carries the data's names and colours; the masks, colour maps and the evaluation use them;
    --evaluate scores exactly the masks inference.py writes."""
    root = make_folder_dataset(size=(40, 24)) if kind == "folder" else make_camvid(size=(40, 24))
    weights = train(root, tmp_path / "run", "--image_size", "32x16")
    assert capsys.readouterr().out.startswith(f"preset {kind} ({kind} data at {root})")
    saved = torch.load(weights, weights_only=True)
    table = SegmentationDataset(root, "val", (32, 16)).class_table
    assert saved["class_names"] == table.names and saved["class_colors"] == table.colors.tolist()
    assert saved["dataset"] == kind
    assert saved["model_config"]["bilinear"] is True  # the camvid recipe's decoder, rebuilt by inference.py below

    images = root / ("images" if kind == "folder" else "") / "val"
    assert inference.main(["--checkpoint", str(weights), "--input", str(images), "--output", str(tmp_path / "masks"),
                           "--device", "cpu", "--num_workers", "0"]) == 0
    for path in images.iterdir():
        mask = png(tmp_path / "masks" / f"{path.stem}_mask.png")
        assert mask.shape == png(path).shape[:2] and mask.max() < table.num_classes
        np.testing.assert_array_equal(png(tmp_path / "masks" / f"{path.stem}_color.png"), table.colors[mask])

    assert inference.main(["--checkpoint", str(weights), "--evaluate", "--data_root", str(root), "--output",
                           str(tmp_path / "evaluation"), "--device", "cpu", "--num_workers", "0"]) == 0
    report = json.loads((tmp_path / "evaluation" / "evaluation_val.json").read_text())
    assert report["dataset"] == kind and list(report["per_class"]) == table.names
    val = SegmentationDataset(root, "val", (32, 16), label_resolution=True)
    assert report["miou"] == pytest.approx(mask_file_miou(tmp_path / "masks", val), abs=1e-6)

    capsys.readouterr()
    assert inference.main(["--checkpoint", str(weights), "--input", str(images), "--output", str(tmp_path / "ids"),
                           "--label_ids", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --label_ids: this model's classes are not Cityscapes classes; "
                                               "label ids exist for Cityscapes only")


def test_a_class_subset_and_the_device_cache_on_camvid(make_camvid, tmp_path):
    root = make_camvid()
    weights = train(root, tmp_path / "run", "--image_size", "48x36", "--classes", "Road", "Car", "Sky",
                    "--data_cache", "device")
    saved = torch.load(weights, weights_only=True)
    assert saved["class_names"] == ["Road", "Car", "Sky"]
    assert saved["class_colors"] == [list(CAMVID_COLORS[3]), list(CAMVID_COLORS[8]), list(CAMVID_COLORS[0])]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["preset"], config["dataset"], config["data_cache"]) == ("camvid", "camvid", "device")
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert list(final["per_class_iou"]) == ["Road", "Car", "Sky"]


def test_the_layout_can_be_forced_and_a_wrong_one_is_one_line(make_camvid, tmp_path, capsys):
    root = make_camvid()
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--dataset", "folder", "--data_root", str(root), *TINY, "--out_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {root / 'classes.txt'}: missing (one class per line, in index " \
                                              f"order: NAME [R G B])"
    assert open_layout(root, "camvid").kind == "camvid"
    assert not (tmp_path / "run").exists()


def test_holdout_copies_camvid_with_a_whole_drive_as_val_and_the_rest_as_train(make_camvid, tmp_path, capsys):
    root = make_camvid(counts={"train": 4, "val": 2, "test": 1})
    held_out = []
    for split, count in (("train", 2), ("val", 1)):  # some train and val frames of a second drive, 0006R0
        for path in sorted((root / split).iterdir())[:count]:
            name = path.name.replace("0001TP", "0006R0" if split == "train" else "0006R0_9")
            held_out.append(name)
            for folder in (split, f"{split}annot"):
                (root / folder / path.name).rename(root / folder / name)
    source = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    out = tmp_path / "driveout"
    assert dataset.main(["holdout", "--src", str(root), "--dst", str(out), "--val_drive", "0006R0"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{out}: train 3 frames, val 3 frames, test 1 frames")
    assert sorted(path.name for path in (out / "val").iterdir()) == sorted(held_out)
    assert sorted(path.name for path in (out / "valannot").iterdir()) == sorted(held_out)
    assert all(path.name.startswith("0001TP") for path in (out / "train").iterdir())
    assert len(list((out / "train").iterdir())) == 3 and len(list((out / "test").iterdir())) == 1
    for path in out.rglob("*.png"):  # byte copies of the source's files
        originals = [data for source_path, data in source.items() if source_path.name == path.name
                     and source_path.parent.name.endswith("annot") == path.parent.name.endswith("annot")]
        assert path.read_bytes() in originals
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == source  # untouched
    assert len(SegmentationDataset(out, "val", (48, 36), layout="camvid")) == 3

    for argv, message in (
            (["--dst", str(tmp_path / "x"), "--val_drive", "0005VD"], f"{root}: no frames of drive 0005VD (its drives: "
                                                                     "0001TP, 0006R0)"),
            (["--dst", str(tmp_path / "y"), "--val_drive", "0001TP", "0006R0"], "--val_drive: holding out every drive "
                                                                                "(0001TP, 0006R0) leaves nothing to "
                                                                                "train on"),
            (["--dst", str(out)], f"{out}: destination must be a new or empty folder outside {root}")):
        assert dataset.main(["holdout", "--src", str(root), *argv]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    clash = make_camvid("clash", counts={"train": 2, "val": 2})  # train and val both hold 0001TP_006720.png
    for folder in ("train", "trainannot"):
        (clash / folder / "0001TP_006690.png").rename(clash / folder / "0006R0_006690.png")
    assert dataset.main(["holdout", "--src", str(clash), "--dst", str(tmp_path / "z")]) == 2
    assert capsys.readouterr().err == (f"error: {clash}: 0001TP_006720.png is in both train and val; their copies "
                                       f"would share {tmp_path / 'z' / 'train' / '0001TP_006720.png'}\n")
