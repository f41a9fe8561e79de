"""inference.py: every kind of image a user has, safe outputs, checkpoint loading, and an evaluation
that agrees with an independent ConfusionMatrix and with the official cityscapesscripts evaluation."""
import builtins
import copy
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import Cityscapes

import inference
import unet
from conftest import noise
from dataset import MEAN, STD, ClassTable, SegmentationDataset, read_photo, resize_image
from metrics import ConfusionMatrix
from unet import UNet, fold_batchnorm, upsample_argmax

REPO = Path(__file__).resolve().parents[1]
TRAINING_SIZE = (32, 16)  # (width, height) the tiny test checkpoints claim to be trained at
CLASSES = ClassTable.from_names()


def CityscapesDataset(root, split, image_size):
    return SegmentationDataset(root, split, image_size, layout="cityscapes")


def tiny_unet(num_classes=19, depth=2, bilinear=False, seed=0, input_norm="dataset"):
    torch.manual_seed(seed)
    return UNet(3, num_classes, base_channels=4, depth=depth, dropout=0.0, bilinear=bilinear,
                input_norm=input_norm).eval()


def save_checkpoint(path, model, class_names=None, image_size=TRAINING_SIZE):
    """A weights file as training.py wrote it before it recorded class colours (still read as it is)."""
    torch.save({"model": model.state_dict(), "model_config": model.config,
                "class_names": class_names or CLASSES.names, "image_size": list(image_size),
                "mean": list(MEAN), "std": list(STD)}, path)
    return path


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "unet_model.pth", tiny_unet())


def run(*argv):
    """inference.main in-process on the CPU, decoding in the main process (fast for tiny inputs)."""
    return inference.main([*map(str, argv), "--device", "cpu", "--num_workers", "0"])


def reference_mask(model, photo):
    """Independent of inference.py's batching and chunking: resize like the dataset, normalise,
    one forward pass, upsample all logits at once, argmax."""
    pixels = resize_image(torch.from_numpy(np.array(photo)).permute(2, 0, 1), TRAINING_SIZE)
    pixels = (pixels.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        logits = model(pixels[None])
    return F.interpolate(logits, size=photo.shape[:2], mode="bilinear", align_corners=False).argmax(1)[0].numpy()


def write_every_kind(folder, rng):
    """One file per kind of image a user may drop in; returns {file name: displayed (W, H)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = noise(rng, 40, 64)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=92)
    Image.fromarray(rgb).save(folder / "UPPER CASE.JPEG")
    Image.fromarray(rgb).save(folder / "name with spaces.png")
    Image.fromarray(rgb).save(folder / "bitmap.BMP")
    Image.fromarray(rgb).save(folder / "web.webp", lossless=True)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 64), 200, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 0], np.full((40, 64), 255, np.uint8)])).save(folder / "la.png")
    Image.fromarray(rgb).quantize(16).save(folder / "palette.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "sixteen bit.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(noise(rng, 7, 5)).save(folder / "tiny.png")
    Image.fromarray(noise(rng, 1, 1)).save(folder / "one pixel.png")
    Image.fromarray(noise(rng, 60, 4100)).save(folder / "wide.png")
    Image.fromarray(noise(rng, 30, 20)).save(folder / "same.png")  # same stem as same.jpg
    Image.fromarray(noise(rng, 20, 30)).save(folder / "same.jpg")
    with Image.open(folder / "photo.jpg") as image:
        assert image.mode == "RGB"
    sizes = {path.name: Image.open(path).size for path in folder.iterdir()}
    assert {Image.open(folder / name).mode for name in sizes} >= {"RGB", "L", "RGBA", "LA", "P", "I;16", "CMYK"}
    return sizes


def file_hashes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()}


@pytest.mark.both_cpu_kinds
def test_inference_is_float32_on_any_cpu_and_bf16_when_asked_with_the_masks_of_segmenter(tmp_path, checkpoint):
    """--amp auto segments in float32 on every CPU, native bf16 or not (the same masks on every machine, and those
    of the float32 ONNX export); --amp bf16 runs bf16 and gives Segmenter(amp="bf16")'s masks. bf16 keeps 8
    significant bits, so a pixel whose two best logits lie within about 1% of each other may change class: on
    this tiny random model at least 90% of the pixels keep theirs."""
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.fromarray(noise(rng, 40, 64)).save(photos / f"p{index}.png")
    masks, logits = {}, {}
    for amp in ("auto", "bf16"):
        assert run("--checkpoint", checkpoint, "--input", photos, "--output", tmp_path / amp, "--amp", amp) == 0
        segmenter = inference.Segmenter(checkpoint, device="cpu", amp=amp)
        assert segmenter.amp_dtype == (torch.bfloat16 if amp == "bf16" else None)
        masks[amp] = np.stack([np.array(Image.open(tmp_path / amp / f"p{index}_mask.png")) for index in range(3)])
        np.testing.assert_array_equal(masks[amp], np.stack([segmenter(photos / f"p{index}.png") for index in range(3)]))
        logits[amp] = segmenter.logits(segmenter.model_input(read_photo(photos / "p0.png"))[None])
    assert not torch.equal(logits["auto"], logits["bf16"])  # bf16 did run
    assert (masks["auto"] == masks["bf16"]).mean() >= 0.9


@pytest.mark.both_cpu_kinds
def test_every_image_kind_gets_mask_color_and_overlay_at_its_own_size(tmp_path, checkpoint, monkeypatch):
    # as if wide.png (4100x60) were a 4000x3000 photo: its logits are upsampled 5 classes at a time
    monkeypatch.setattr(unet, "UPSAMPLE_BYTES", 5 * 4 * 4100 * 60)
    images = tmp_path / "images"
    sizes = write_every_kind(images, np.random.default_rng(0))
    (images / "readme.md").write_text("not an image: ignored in folder mode")
    before = file_hashes(images)
    output = tmp_path / "new" / "predictions"  # nested and missing: created
    assert run("--checkpoint", checkpoint, "--input", images, "--output", output, "--batch_size", 3) == 0
    assert file_hashes(images) == before  # inputs untouched

    names = {name: (name if Path(name).stem == "same" else Path(name).stem) for name in sizes}
    expected = {f"{base}_{kind}" for base in names.values() for kind in ("mask.png", "color.png", "overlay.jpg")}
    assert {path.name for path in output.iterdir()} == expected
    model = tiny_unet()
    predicted_classes = set()
    for file_name, base in names.items():
        mask_image = Image.open(output / f"{base}_mask.png")
        color_image = Image.open(output / f"{base}_color.png")
        overlay_image = Image.open(output / f"{base}_overlay.jpg")
        assert (mask_image.mode, color_image.mode, overlay_image.mode) == ("L", "RGB", "RGB")
        assert mask_image.size == color_image.size == overlay_image.size == sizes[file_name]
        mask = np.asarray(mask_image)
        assert mask.max() < CLASSES.num_classes
        np.testing.assert_array_equal(np.asarray(color_image), CLASSES.colors[mask])
        predicted_classes |= set(np.unique(mask).tolist())
    assert len(predicted_classes) >= 3  # the tiny model gives non-trivial masks, so the checks bite

    for file_name in ("name with spaces.png", "wide.png", "one pixel.png", "same.jpg"):
        photo = np.asarray(Image.open(images / file_name).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(output / f"{names[file_name]}_mask.png")),
                                      reference_mask(model, photo))
    # 16-bit values v * 257 must give exactly the 8-bit image v (scaled, not clipped to white)
    sixteen = np.asarray(Image.open(output / "sixteen bit_mask.png"))
    gray8 = np.repeat(np.asarray(Image.open(images / "sixteen bit.png")).astype(np.float64)[..., None] / 257, 3, -1)
    np.testing.assert_array_equal(sixteen, reference_mask(model, gray8.round().astype(np.uint8)))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_load_photo_converts_every_mode_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = noise(rng, 12, 10)
    alpha = np.full((12, 10), 255, np.uint8)
    alpha[0, 0] = 0  # one fully transparent pixel
    source = {
        "L": Image.fromarray(rgb[..., 0]),
        "LA": Image.fromarray(np.dstack([rgb[..., 0], alpha])),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha])),
        "P": Image.fromarray(rgb).quantize(8),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }[mode]
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    source.save(path)
    photo = read_photo(path)
    assert photo.dtype == np.uint8 and photo.shape == (12, 10, 3)
    expected = {
        "L": np.repeat(rgb[..., :1], 3, -1),
        "LA": np.repeat(rgb[..., :1], 3, -1),
        "RGBA": rgb,
        "P": np.asarray(source.convert("RGB")),
        "I;16": np.repeat(rgb[..., :1], 3, -1),
        "CMYK": np.asarray(Image.open(path).convert("RGB")),
    }[mode].copy()
    if mode in ("LA", "RGBA"):
        expected[0, 0] = 255  # transparency is composited over white
    np.testing.assert_array_equal(photo, expected)
    if mode == "CMYK":  # and the decoded colours are close to the original ones
        assert np.abs(photo.astype(int) - rgb).mean() < 8


def test_exif_rotated_photo_mask_matches_the_photo_as_displayed(tmp_path, checkpoint):
    stored = noise(np.random.default_rng(2), 20, 40)  # 40 wide, 20 high as stored
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    Image.fromarray(stored).save(images / "rotated.png", exif=exif)
    Image.fromarray(np.rot90(stored, -1)).save(images / "upright.png")
    np.testing.assert_array_equal(read_photo(images / "rotated.png"), np.rot90(stored, -1))
    assert run("--checkpoint", checkpoint, "--input", images, "--output", output) == 0
    for kind in ("mask.png", "color.png"):
        rotated = Image.open(output / f"rotated_{kind}")
        assert rotated.size == (20, 40)
        np.testing.assert_array_equal(np.asarray(rotated), np.asarray(Image.open(output / f"upright_{kind}")))


def test_bad_files_warn_once_each_and_the_rest_is_written(tmp_path, checkpoint, capsys):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    good = noise(np.random.default_rng(3), 24, 32)
    Image.fromarray(good).save(images / "good.png")
    buffer = io.BytesIO()
    Image.fromarray(good).save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    png = (images / "good.png").read_bytes()
    (images / "truncated.png").write_bytes(png[: len(png) - 40])
    (images / "empty.png").write_bytes(b"")
    (images / "text.webp").write_text("this is not an image")
    (images / "garbage.bmp").write_bytes(np.random.default_rng(4).bytes(300))
    bad = {"truncated.jpg", "truncated.png", "empty.png", "text.webp", "garbage.bmp"}
    assert run("--checkpoint", checkpoint, "--input", images, "--output", output, "--batch_size", 2) == 1
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.split("\n") if "warning:" in line]
    assert len(warnings) == len(bad)
    assert all(line.startswith("warning: skipped ") for line in warnings)  # never after a progress bar's \r
    for name in bad:
        assert sum(name in line for line in warnings) == 1
    assert "empty file" in next(line for line in warnings if "empty.png" in line)
    assert "1 written, 5 skipped" in captured.out
    assert {path.name for path in output.iterdir()} == {"good_mask.png", "good_color.png", "good_overlay.jpg"}


def test_worker_processes_give_the_same_masks(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for index, (height, width) in enumerate([(40, 64), (7, 5), (60, 300), (33, 17), (16, 32)]):
        Image.fromarray(noise(rng, height, width)).save(images / f"{index}.png")
    (images / "broken.png").write_text("not a png")
    single, workers = tmp_path / "single", tmp_path / "workers"
    assert run("--checkpoint", checkpoint, "--input", images, "--output", single) == 1
    assert inference.main(["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(workers),
                           "--device", "cpu", "--num_workers", "2", "--batch_size", "4"]) == 1
    masks = sorted(path.name for path in single.glob("*_mask.png"))
    assert masks == sorted(path.name for path in workers.glob("*_mask.png")) and len(masks) == 5
    for name in masks:
        np.testing.assert_array_equal(np.asarray(Image.open(single / name)), np.asarray(Image.open(workers / name)))


def test_output_folder_holding_an_input_is_refused(tmp_path, checkpoint, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(noise(np.random.default_rng(6), 16, 16)).save(images / "x.png")
    before = file_hashes(images)
    assert run("--checkpoint", checkpoint, "--input", images, "--output", images) == 2
    same_folder_spelled_differently = tmp_path / "other" / ".." / "images"
    assert run("--checkpoint", checkpoint, "--input", images / "x.png", "--output", same_folder_spelled_differently) == 2
    assert file_hashes(images) == before
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: output folder") for line in errors)
    # a sub-folder of the input folder is fine: folder mode does not recurse, so it is never read back
    assert run("--checkpoint", checkpoint, "--input", images, "--output", images / "predictions") == 0
    assert file_hashes(images) == before
    assert len(list((images / "predictions").iterdir())) == 3


def test_output_that_cannot_be_a_folder_is_one_line(tmp_path, checkpoint, make_cityscapes, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(noise(np.random.default_rng(6), 16, 16)).save(images / "x.png")
    existing = tmp_path / "results.txt"
    existing.write_text("the user's data")
    root = make_cityscapes(counts={"val": 1})
    assert run("--checkpoint", checkpoint, "--input", images, "--output", existing) == 2
    assert run("--checkpoint", checkpoint, "--evaluate", "--data_root", root, "--output", existing) == 2
    assert run("--checkpoint", checkpoint, "--input", images, "--output", existing / "predictions") == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().split("\n")
    assert errors[:2] == [f"error: output {existing} is an existing file, not a folder: choose another --output"] * 2
    assert errors[2].startswith("error: ") and str(existing / "predictions") in errors[2] and len(errors) == 3
    assert "Traceback" not in captured.err and existing.read_text() == "the user's data"


def test_files_that_are_not_images_are_listed_in_the_summary(tmp_path, checkpoint, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(15)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(noise(rng, 16, 24)).save(images / name)
    (images / "readme.md").write_text("drop photos here")
    (images / "notes.txt").write_text("taken on a rainy day")
    (images / ".hidden").write_text("hidden files are not mentioned")
    assert run("--checkpoint", checkpoint, "--input", images, "--output", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert captured.out.strip().split("\n")[-1] == \
        f"3 written, 0 skipped, 2 not images (notes.txt, readme.md) -> {tmp_path / 'out'}"
    assert "warning" not in captured.err
    assert len(list((tmp_path / "out").iterdir())) == 9
    (images / "c.png").write_text("an image extension but no image: a warning, and exit status 1")
    (images / "notes.txt").unlink()
    assert run("--checkpoint", checkpoint, "--input", images, "--output", tmp_path / "again") == 1
    captured = capsys.readouterr()
    assert captured.out.strip().split("\n")[-1] == \
        f"2 written, 1 skipped, 1 not an image (readme.md) -> {tmp_path / 'again'}"
    assert [line for line in captured.err.split("\n") if line] == [
        f"warning: skipped {images / 'c.png'}: not an image, or not a supported format "
        "(JPEG, PNG, BMP, WebP, TIFF, GIF, PPM)"]


def test_every_flag_has_help_that_states_its_default(capsys):
    parser = inference.build_parser()
    flags = [action for action in parser._actions if action.dest != "help"]
    assert {"num_classes", "base_channels", "depth", "bilinear"} <= {action.dest for action in flags}
    for action in flags:
        text = (action.help or "") % {"default": action.default}
        if action.default not in (None, False):
            assert f"(default: {action.default})" in text, action.dest
        else:
            assert "(default: " in text or "(required with" in text, action.dest
    with pytest.raises(SystemExit) as exit_info:
        inference.parse_args(["--help"])
    assert exit_info.value.code == 0 and "(default: 8)" in capsys.readouterr().out


def test_output_names_never_collide_or_leave_the_folder(tmp_path):
    paths = [Path("a/x.jpg"), Path("a/x.png"), Path("a/y.png"), Path("b/y.png"), Path("a/Z.PNG"), Path("a/z.bmp"),
             Path("a/../w.png")]
    names = inference.output_names(paths)
    assert names == ["x.jpg", "x.png", "y.png", "y.png_2", "Z.PNG", "z.bmp", "w"]
    assert all("/" not in name and name not in ("", ".", "..") for name in names)


def test_glob_and_single_file_inputs(tmp_path, checkpoint):
    images = tmp_path / "images"
    write_every_kind(images, np.random.default_rng(7))
    assert run("--checkpoint", checkpoint, "--input", images / "*.png", "--output", tmp_path / "glob") == 0
    png_stems = {path.stem for path in images.glob("*.png")}  # same.jpg is not matched, so no collision
    assert {path.name.removesuffix("_mask.png") for path in (tmp_path / "glob").glob("*_mask.png")} == png_stems
    assert run("--checkpoint", checkpoint, "--input", images / "web.webp", "--output", tmp_path / "one") == 0
    assert sorted(path.name for path in (tmp_path / "one").iterdir()) == [
        "web_color.png", "web_mask.png", "web_overlay.jpg"]
    assert run("--checkpoint", checkpoint, "--input", tmp_path / "nothing" / "*.png", "--output", tmp_path / "x") == 2


def test_label_ids_masks_hold_official_label_ids(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(8)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(noise(rng, 48, 64)).save(images / name)
    assert run("--checkpoint", checkpoint, "--input", images, "--output", tmp_path / "train") == 0
    assert run("--checkpoint", checkpoint, "--input", images, "--output", tmp_path / "label", "--label_ids") == 0
    train_to_label = {c.train_id: c.id for c in Cityscapes.classes if 0 <= c.train_id < 255}  # torchvision's table
    for path in (tmp_path / "train").glob("*_mask.png"):
        train_ids = np.asarray(Image.open(path))
        label_ids = np.asarray(Image.open(tmp_path / "label" / path.name))
        assert set(np.unique(label_ids).tolist()) <= set(train_to_label.values())
        np.testing.assert_array_equal(label_ids, np.vectorize(train_to_label.get)(train_ids))
        # the colour map and overlay stay in train-id colours
        assert (tmp_path / "label" / path.name.replace("_mask.png", "_color.png")).read_bytes() == \
            (tmp_path / "train" / path.name.replace("_mask.png", "_color.png")).read_bytes()


@pytest.mark.parametrize("depth,bilinear,num_classes,input_norm", [(2, False, 19, "dataset"), (3, True, 19, "dataset"),
                                                                  (1, False, 7, "dataset"), (2, False, 19, "photo")])
def test_bare_state_dict_matches_the_full_checkpoint(tmp_path, depth, bilinear, num_classes, input_norm):
    model = tiny_unet(num_classes, depth, bilinear, input_norm=input_norm)
    names = CLASSES.names[:num_classes]
    full = save_checkpoint(tmp_path / "full.pth", model, class_names=names)
    bare = tmp_path / "bare.pth"
    # saved from a torch.compile'd model: keys carry the "_orig_mod." prefix
    torch.save({f"_orig_mod.{key}": value for key, value in model.state_dict().items()}, bare)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(noise(np.random.default_rng(9), 24, 40)).save(images / "street.png")
    assert run("--checkpoint", full, "--input", images, "--output", tmp_path / "full") == 0
    size = f"{TRAINING_SIZE[0]}x{TRAINING_SIZE[1]}"
    classes = [] if num_classes == 19 else ["--classes", *names]
    norm = [] if input_norm == "dataset" else ["--input_norm", input_norm]  # no weight shape tells it
    assert run("--checkpoint", bare, "--input", images, "--output", tmp_path / "bare", "--image_size", size,
               *classes, *norm) == 0
    for kind in ("mask.png", "color.png"):
        full_bytes = (tmp_path / "full" / f"street_{kind}").read_bytes()
        assert full_bytes == (tmp_path / "bare" / f"street_{kind}").read_bytes()
    loaded = inference.Segmenter(bare, device="cpu", classes=names, input_norm=input_norm)
    assert loaded.model.config == {**model.config, "dropout": loaded.model.config["dropout"]}


def test_bare_state_dict_that_fits_no_unet_is_a_clear_error(tmp_path, capsys):
    bare = tmp_path / "bare.pth"
    torch.save(tiny_unet().state_dict(), bare)
    assert run("--checkpoint", bare, "--input", tmp_path, "--output", tmp_path / "out", "--depth", "3") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: bare state_dict") and "--depth" in error and "\n" not in error


class CreatesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("legacy_format", [False, True])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, legacy_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    contents = {"model": CreatesAFileWhenUnpickled(marker), "model_config": {}}
    torch.save(contents, evil, _use_new_zipfile_serialization=not legacy_format)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(noise(np.random.default_rng(10), 16, 16)).save(images / "x.png")
    assert run("--checkpoint", evil, "--input", images, "--output", tmp_path / "out") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: refused to load checkpoint {evil}") and "\n" not in error
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(evil, weights_only=False)  # the file really is malicious: a plain load runs its code
    assert marker.exists()


def test_missing_checkpoint_says_to_train_first(tmp_path, capsys):
    assert run("--checkpoint", tmp_path / "unet_model.pth", "--input", tmp_path) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unet_model.pth not found" in error and "python training.py" in error


def truncated_checkpoint(path):
    save_checkpoint(path, tiny_unet())
    path.write_bytes(path.read_bytes()[:2000])


# torch.load fails on these with IndexError, KeyError, UnpicklingError, EOFError, RuntimeError, ...
@pytest.mark.parametrize("kind", ["notes", "word", "text", "zeros", "random", "empty", "json", "truncated", "image"])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_it(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pth"
    {
        "notes": lambda: path.write_text("some notes\nline two\n"),
        "word": lambda: path.write_text("hello"),
        "text": lambda: path.write_text("notes for the team\nthe checkpoint is on the server\n"),
        "zeros": lambda: path.write_bytes(b"\x00" * 100),
        "random": lambda: path.write_bytes(np.random.default_rng(12).bytes(500)),
        "empty": lambda: path.write_bytes(b""),
        "json": lambda: path.write_text(json.dumps({"model": [1, 2]})),
        "truncated": lambda: truncated_checkpoint(path),
        "image": lambda: Image.fromarray(noise(np.random.default_rng(12), 8, 8)).save(path, format="PNG"),
    }[kind]()
    assert run("--checkpoint", path, "--input", tmp_path, "--output", tmp_path / "out") == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert "\n" not in error and error.startswith(f"error: checkpoint {path} ")
    assert ("is empty" if kind == "empty" else "is not a PyTorch checkpoint") in error
    assert "refused" not in error and "Traceback" not in captured.err and not (tmp_path / "out").exists()


@pytest.mark.both_cpu_kinds
@pytest.mark.parametrize("bilinear", [False, True])
def test_folded_batchnorm_gives_the_logits_of_the_trained_model(bilinear, tmp_path):
    model = tiny_unet(depth=3, bilinear=bilinear).train()
    with torch.no_grad():  # running statistics and affine parameters far from their initial 0 / 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
        for step in range(3):
            model(torch.randn(4, 3, 16, 32) * 3 + step)
    model.eval()
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and max(norm.running_mean.abs().max().item() for norm in norms) > 0.1
    assert max((norm.running_var - 1).abs().max().item() for norm in norms) > 0.1
    images = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        expected = model(images)
        folded = fold_batchnorm(copy.deepcopy(model))
        assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
        assert expected.std() > 0.1  # non-trivial logits: a tolerance of 1e-5 is tight
        torch.testing.assert_close(folded(images), expected, rtol=1e-5, atol=1e-5)
    deployed = inference.Segmenter(save_checkpoint(tmp_path / "model.pth", model), device="cpu", channels_last="on")
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in deployed.model.modules())
    torch.testing.assert_close(deployed.logits(images), expected, rtol=1e-5, atol=1e-5)


def test_upsample_argmax_in_class_chunks_equals_the_full_argmax(monkeypatch):
    torch.manual_seed(11)
    logits = torch.randn(19, 5, 7)
    logits[3] = logits[7]  # exact ties resolve to the lower class, as torch.argmax does
    full = F.interpolate(logits[None], size=(61, 83), mode="bilinear", align_corners=False).argmax(1)[0]
    for chunk_bytes in (4 * 61 * 83, 3 * 4 * 61 * 83, 2**30):
        monkeypatch.setattr(unet, "UPSAMPLE_BYTES", chunk_bytes)
        assert torch.equal(upsample_argmax(logits, (61, 83)), full)


def test_no_arguments_uses_the_readme_folders(tmp_path, monkeypatch, capsys):
    save_checkpoint(tmp_path / "unet_model.pth", tiny_unet())
    images = tmp_path / "InferenceOutput" / "TestImages"
    images.mkdir(parents=True)
    (images / "readme.md").write_text("drop images here")
    Image.fromarray(noise(np.random.default_rng(13), 32, 48)).save(images / "street.jpg")
    monkeypatch.chdir(tmp_path)
    assert inference.main([]) == 0
    assert "1 written, 0 skipped" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "InferenceOutput" / "TestPredictions").iterdir()) == [
        "street_color.png", "street_mask.png", "street_overlay.jpg"]


def test_command_line_without_a_checkpoint_says_to_train_first(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "inference.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: checkpoint unet_model.pth not found: train a model first with `python training.py` "
        "(or pass --checkpoint PATH)"]


def independent_scores(model, root, split):
    """ConfusionMatrix over full-resolution targets mapped with torchvision's table, with logits
    from the dataset's input upsampled in one piece, by the trained model as it is (BatchNorm unfolded,
    NCHW, one image per forward pass)."""
    dataset = CityscapesDataset(root, split=split, image_size=TRAINING_SIZE)
    label_to_train = np.full(256, 255, np.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.train_id < 255 and c.id >= 0:
            label_to_train[c.id] = c.train_id
    confusion = ConfusionMatrix(19)
    for index, (image_path, mask_path) in enumerate(dataset.samples):
        target = torch.from_numpy(label_to_train[np.asarray(Image.open(mask_path))].astype(np.int64))
        with torch.no_grad():
            logits = model(dataset[index][0][None])
        pred = F.interpolate(logits, size=target.shape, mode="bilinear", align_corners=False).argmax(1)
        confusion.update(pred, target[None])
    return confusion


@pytest.mark.both_cpu_kinds
def test_evaluate_matches_an_independent_confusion_matrix_and_the_official_evaluation(
        tmp_path, checkpoint, make_cityscapes, capsys):
    root = make_cityscapes(size=(64, 32), counts={"val": 4}, noise=20)
    output = tmp_path / "evaluation"
    assert run("--checkpoint", checkpoint, "--evaluate", "--data_root", root, "--split", "val",
               "--output", output, "--save_label_ids", "--batch_size", 3) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "road" in printed
    report = json.loads((output / "evaluation_val.json").read_text())
    assert (output / "confusion_matrix_val.png").stat().st_size > 0
    assert report["split"] == "val" and report["num_images"] == 4 and report["checkpoint"] == str(checkpoint)

    # inference.py runs the model BatchNorm-folded, channels_last and batched: the same function
    # (test_folded_batchnorm_...) in another float order, which may flip a pixel whose two best
    # classes tie to ~1e-6. So every pixel is counted in the same ground-truth row, at most 0.1% of
    # them in another column, and the scores are exactly those of the reported matrix.
    confusion = independent_scores(tiny_unet(), root, "val")
    expected, reference = confusion.compute(), confusion.matrix.numpy()
    matrix = np.array(report["confusion_matrix"])
    assert (reference.sum(0) > 0).sum() >= 3  # several classes predicted: the comparison bites
    assert reference.sum() > 4 * 16 * 32  # counted at full label resolution
    np.testing.assert_array_equal(matrix.sum(1), reference.sum(1))
    assert np.abs(matrix - reference).sum() / 2 <= 0.001 * reference.sum()
    true_pos = np.diag(matrix).astype(np.float64)
    with np.errstate(invalid="ignore"):
        iou = true_pos / (matrix.sum(0) + matrix.sum(1) - true_pos)
    assert report["miou"] == pytest.approx(np.nanmean(iou), abs=1e-12)
    assert report["pixel_acc"] == pytest.approx(true_pos.sum() / matrix.sum(), abs=1e-12)
    for name, class_iou in zip(CLASSES.names, iou):
        assert report["per_class"][name]["iou"] == (None if np.isnan(class_iou) else pytest.approx(class_iou,
                                                                                                     abs=1e-12))
    for key in ("miou", "fwiou", "pixel_acc", "mean_acc"):
        assert report[key] == pytest.approx(expected[key], abs=1e-3)

    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    official.args.evalInstLevelScore = False
    official.args.quiet = True
    official.args.JSONOutput = False
    official.args.predictionPath = str(output / "label_ids")
    official.args.predictionWalk = None
    ground_truths = sorted(str(path) for path in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    predictions = [official.getPrediction(official.args, path) for path in ground_truths]
    assert [Path(path).name for path in predictions] == [
        Path(path).name.replace("gtFine_labelIds", "leftImg8bit") for path in ground_truths]
    scores = official.evaluateImgLists(predictions, ground_truths, official.args)
    assert scores["averageScoreClasses"] == pytest.approx(report["miou"], abs=1e-6)


def test_evaluate_refuses_the_unlabelled_test_split(tmp_path, checkpoint, make_cityscapes, capsys):
    root = make_cityscapes(counts={"test": 1})
    assert run("--checkpoint", checkpoint, "--evaluate", "--data_root", root, "--split", "test",
               "--output", tmp_path / "out") == 2
    assert "no labels" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.both_cpu_kinds
def test_evaluating_what_training_wrote_reproduces_its_final_val_scores(tmp_path, capsys, monkeypatch, native_bf16):
    """End to end: a few training.py steps on the synthetic city, then --evaluate must give training's numbers to
    the last decimal: both run metrics.score_split on a Predictor in inference's precision, which is float32 on any
    CPU, also where training itself ran in bf16 (a CPU with native bf16)."""
    import training

    runs = []
    start_run = training.start_run
    monkeypatch.setattr(training, "start_run",
                        lambda *args, **kwargs: runs.append(start_run(*args, **kwargs)) or runs[-1])
    training.main(["--dataset", "synthetic", "--data_root", str(tmp_path / "synthetic"), "--synthetic_train", "4",
                   "--synthetic_val", "3", "--image_size", "64x32", "--base_channels", "4", "--depth", "2",
                   "--training_iterations", "3", "--eval_interval", "3", "--save_model_interval", "3",
                   "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--out_dir", str(tmp_path / "run"),
                   "--model_path", str(tmp_path / "unet_model.pth")])
    assert runs[0].amp_dtype == (torch.bfloat16 if native_bf16 else None)  # the precision training ran in
    trained = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert trained["final"] and trained["step"] == 3
    assert run("--checkpoint", tmp_path / "unet_model.pth", "--evaluate", "--data_root", tmp_path / "synthetic",
               "--output", tmp_path / "evaluation") == 0
    report = json.loads((tmp_path / "evaluation" / "evaluation_val.json").read_text())
    assert report["num_images"] == 3
    for key in ("miou", "fwiou", "pixel_acc", "mean_acc"):
        assert report[key] == pytest.approx(trained[key], abs=1e-12)
    assert {name: scores["iou"] for name, scores in report["per_class"].items()} == pytest.approx(
        trained["per_class_iou"], abs=1e-12, nan_ok=True)


def test_evaluate_stops_on_a_corrupt_split_file_with_one_line_naming_it(tmp_path, checkpoint, make_cityscapes,
                                                                       capsys):
    root = make_cityscapes(counts={"val": 2})
    broken = sorted(root.glob("leftImg8bit/val/*/*_leftImg8bit.png"))[1]
    broken.write_bytes(b"not a png")
    assert inference.main(["--checkpoint", str(checkpoint), "--evaluate", "--data_root", str(root),
                           "--output", str(tmp_path / "out"), "--device", "cpu", "--num_workers", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {broken}: ") and "Traceback" not in error


def test_alpha_blends_the_palette_over_the_photo(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    photo = noise(np.random.default_rng(14), 48, 64)
    Image.fromarray(photo).save(images / "street.png")
    for alpha in ("0", "1", "0.25"):
        assert run("--checkpoint", checkpoint, "--input", images, "--output", tmp_path / alpha, "--alpha", alpha) == 0
    color = np.asarray(Image.open(tmp_path / "1" / "street_color.png")).astype(float)
    for alpha, expected in ((0, photo), (1, color), (0.25, 0.75 * photo + 0.25 * color)):
        buffer = io.BytesIO()  # the same JPEG encoding, so only rounding differences remain
        Image.fromarray(expected.round().astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        expected_jpeg = np.asarray(Image.open(buffer)).astype(float)
        blended = np.asarray(Image.open(tmp_path / str(alpha) / "street_overlay.jpg")).astype(float)
        assert np.abs(blended - expected_jpeg).max() <= 2
    assert np.abs(color - photo).mean() > 40  # the three cases really differ
