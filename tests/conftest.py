"""Shared fixtures: tiny Cityscapes trees laid out exactly like the official release, extra files included."""
import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import Cityscapes

import runtime

CITIES = ("aachen", "bochum")
NUM_LABEL_IDS = 34
# One distinct colour per label id (the official palette repeats colours), so a pixel's colour tells its label.
LABEL_ID_COLORS = np.array([(10 + 7 * k, 255 - 7 * k, (53 * k) % 256) for k in range(NUM_LABEL_IDS)], dtype=np.uint8)
OFFICIAL_COLORS = {c.id: c.color for c in Cityscapes.classes if c.id >= 0}
LABEL_TO_TRAIN_ID = {c.id: c.train_id for c in Cityscapes.classes if c.id >= 0}


def noise(rng, height, width, channels=3):
    """Smooth random colours (upscaled noise), photo-like enough for a tiny model to predict several classes."""
    small = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), channels), dtype=np.uint8)
    image = Image.fromarray(small.squeeze(-1) if channels == 1 else small)
    return np.asarray(image.resize((width, height), Image.BILINEAR))


def random_label_ids(rng, width, height, block):
    """Blocks of random label ids 0..33 (void ones included) and the ego-vehicle band at the bottom."""
    blocks = rng.integers(0, NUM_LABEL_IDS, size=(-(-height // block), -(-width // block)), dtype=np.uint8)
    label_ids = np.kron(blocks, np.ones((block, block), dtype=np.uint8))[:height, :width]
    label_ids[-max(1, height // 8):] = 1
    return label_ids


def write_sample(root, split, city, stem, label_ids, noise, rng, train_id_files):
    image_dir = root / "leftImg8bit" / split / city
    mask_dir = root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    image = LABEL_ID_COLORS[label_ids].astype(np.int16)
    if noise:
        image += rng.integers(-noise, noise + 1, size=image.shape, dtype=np.int16)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(image_dir / f"{stem}_leftImg8bit.png")
    if split == "test":  # the official test masks are placeholders without real labels
        label_ids = np.zeros_like(label_ids)
    Image.fromarray(label_ids).save(mask_dir / f"{stem}_gtFine_labelIds.png")
    if train_id_files:
        train_ids = np.vectorize(LABEL_TO_TRAIN_ID.get)(label_ids).astype(np.uint8)
        Image.fromarray(train_ids).save(mask_dir / f"{stem}_gtFine_labelTrainIds.png")
    palette = np.array([OFFICIAL_COLORS[k] for k in range(NUM_LABEL_IDS)], dtype=np.uint8)
    Image.fromarray(palette[label_ids]).convert("RGBA").save(mask_dir / f"{stem}_gtFine_color.png")
    Image.fromarray(label_ids.astype(np.uint16) * 1000).save(mask_dir / f"{stem}_gtFine_instanceIds.png")
    height, width = label_ids.shape
    polygons = {"imgHeight": height, "imgWidth": width, "objects": [{"label": "road", "polygon": [[0, 0], [1, 0], [1, 1]]}]}
    (mask_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))


def window_offset(crop, whole):
    """(x, y) where crop (..., h, w) lies inside whole (..., H, W), or None."""
    height, width = crop.shape[-2:]
    return next(((x, y) for y in range(whole.shape[-2] - height + 1) for x in range(whole.shape[-1] - width + 1)
                 if torch.equal(whole[..., y:y + height, x:x + width], crop)), None)


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_cpu_kinds"):
        metafunc.parametrize("native_bf16", [False, True], indirect=True, ids=["cpu_avx2", "cpu_native_bf16"])


@pytest.fixture(autouse=True, scope="session")
def cpu_without_native_bf16():
    """runtime.cpu_has_native_bf16 answers no in this process, whatever the CPU, so that the suite takes the same
    paths everywhere (also in fixtures of a wider scope); both_cpu_kinds tests also run with the answer yes (a CPU
    without native bf16 emulates it: slower, and its last bits may differ from native kernels'). Subprocesses see
    the real CPU, so tests that compare them with an in-process run pin their precision (--amp off)."""
    real = runtime.cpu_has_native_bf16
    runtime.cpu_has_native_bf16 = lambda: False
    yield
    runtime.cpu_has_native_bf16 = real


@pytest.fixture(autouse=True)
def native_bf16(request, monkeypatch):
    """What runtime.cpu_has_native_bf16 answers in this test: no, or both answers in a both_cpu_kinds test (whose
    monkeypatch.undo() would fall back to no)."""
    native = getattr(request, "param", False)
    if native:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    return native


@contextlib.contextmanager
def torch_threads(count):
    """`count` intra-op threads inside the block, the caller's again after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module: bit-identical weights need the same thread count in every run
    (in process and in subprocesses), and on a shared 2-core machine one thread beats two contended ones."""
    with torch_threads(1):
        yield


@pytest.fixture
def make_cityscapes(tmp_path):
    """Factory writing a tiny official-layout tree under tmp_path and returning its root.

    Images are LABEL_ID_COLORS[label id] (+ uniform noise up to `noise`); masks are 8-bit labelIds PNGs of
    `block`-sized squares of random ids 0..33 plus an ego-vehicle band; samples alternate over the cities
    and are named {city}_{seq:06d}_000019. Stray files sit beside the official ones.
    """

    def make(name="cityscapes", size=(64, 32), counts=None, train_id_files=False, noise=0, block=8, seed=0):
        counts = {"train": 4, "val": 2, "test": 2} if counts is None else counts
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        width, height = size
        for split, count in counts.items():
            for index in range(count):
                city = CITIES[index % len(CITIES)]
                stem = f"{city}_{index // len(CITIES):06d}_000019"
                label_ids = random_label_ids(rng, width, height, block)
                write_sample(root, split, city, stem, label_ids, noise, rng, train_id_files)
            for folder, stray in (("gtFine", "notes.txt"), ("leftImg8bit", "Thumbs.db")):
                (root / folder / split / CITIES[0]).mkdir(parents=True, exist_ok=True)
                (root / folder / split / CITIES[0] / stray).write_text("stray file")
        (root / "README").write_text("stray file at the root")
        return root

    return make


@pytest.fixture
def label_id_colors():
    """(34, 3) uint8: the image colour make_cityscapes paints for each label id."""
    return LABEL_ID_COLORS.copy()


FOLDER_CLASSES = [("road", (128, 64, 128)), ("traffic cone", (255, 128, 0)), ("sky", (70, 130, 180)), ("car", (0, 0, 142))]
VOID_COLOR = (0, 0, 0)


def blocky_labels(rng, height, width, num_classes, block=4, void_fraction=0.1):
    """Blocks of random class indices 0..num_classes-1, a share of them void (255), and a void bottom row."""
    blocks = rng.integers(0, num_classes, size=(-(-height // block), -(-width // block)))
    blocks[rng.random(blocks.shape) < void_fraction] = 255
    labels = np.kron(blocks, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    labels[-1] = 255
    return labels


@pytest.fixture
def make_folder_dataset(tmp_path):
    """Factory writing a tiny dataset in the folder layout (classes.txt, images/SPLIT/NAME.EXT, masks/SPLIT/NAME.png)
    and returning its root. Photos alternate png and jpg; masks are L (index), P (index) or RGB (colour) per
    `mask_modes`, cycled; the photo colour of a pixel is its class colour (void: grey). The last class never
    appears in val, the void colour is `void 0 0 0`."""

    def make(name="own", size=(32, 16), counts=None, mask_modes=("L", "P", "RGB"), seed=0):
        return write_folder_dataset(tmp_path / name, size, counts, mask_modes, seed)

    return make


def write_folder_dataset(root, size=(32, 16), counts=None, mask_modes=("L", "P", "RGB"), seed=0):
    """make_folder_dataset's tree at root, for fixtures of a wider scope."""
    counts = {"train": 4, "val": 3} if counts is None else counts
    root.mkdir()
    lines = ["# my classes: NAME [R G B]", ""] + [f"{n} {' '.join(map(str, c))}" for n, c in FOLDER_CLASSES]
    (root / "classes.txt").write_text("\n".join(lines + ["void 0 0 0  # unlabelled", ""]))
    colors = np.array([c for _, c in FOLDER_CLASSES], dtype=np.uint8)
    rng = np.random.default_rng(seed)
    width, height = size
    number = 0
    for split, count in counts.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for index in range(count):
            classes = len(FOLDER_CLASSES) - (1 if split == "val" else 0)
            labels = blocky_labels(rng, height, width, classes)
            photo = np.where(labels[..., None] == 255, 128, colors[labels.clip(max=len(colors) - 1)])
            suffix = ".png" if index % 2 == 0 else ".jpg"
            Image.fromarray(photo.astype(np.uint8)).save(root / "images" / split / f"frame {index}{suffix}",
                                                         **({"quality": 95} if suffix == ".jpg" else {}))
            mode = mask_modes[number % len(mask_modes)]
            number += 1
            mask_path = root / "masks" / split / f"frame {index}.png"
            if mode == "L":
                Image.fromarray(labels).save(mask_path)
            elif mode == "P":
                palette = Image.fromarray(labels).convert("P")
                palette.putpalette([v for c in colors.tolist() for v in c] + [0, 0, 0] * (256 - len(colors)))
                palette.save(mask_path)
            else:
                rgb = np.zeros((height, width, 3), np.uint8)  # void: the void colour 0 0 0
                known = labels != 255
                rgb[known] = colors[labels[known]]
                Image.fromarray(rgb).save(mask_path)
    return root


CAMVID_COLORS = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


@pytest.fixture
def make_camvid(tmp_path):
    """Factory writing a tiny CamVid folder as the SegNet tutorial lays it out: train/ trainannot/ val/ valannot/
    (and test/ testannot/ when asked), 8-bit masks of values 0..10 and 11 (void); the photo colour of a pixel
    is its class's CamVid colour."""

    def make(name="CamVid", size=(48, 36), counts=None, seed=0):
        counts = {"train": 4, "val": 2} if counts is None else counts
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        width, height = size
        colors = np.array(CAMVID_COLORS + [(0, 0, 0)], dtype=np.uint8)
        for split, count in counts.items():
            (root / split).mkdir(parents=True)
            (root / f"{split}annot").mkdir()
            for index in range(count):
                labels = blocky_labels(rng, height, width, 11)
                labels[labels == 255] = 11
                stem = f"0001TP_{6690 + 30 * index:06d}"
                Image.fromarray(colors[labels]).save(root / split / f"{stem}.png")
                Image.fromarray(labels).save(root / f"{split}annot" / f"{stem}.png")
        (root / "train.txt").write_text("/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png\n")
        return root

    return make


# A tiny training run; --amp off: float32 whatever the CPU, so that in-process and subprocess runs agree bit
# for bit
TINY = ["--image_size", "32x16", "--base_channels", "4", "--depth", "2", "--batch_size", "2", "--accum_steps", "1",
        "--warmup_steps", "1", "--log_interval", "1", "--num_workers", "0", "--device", "cpu",
        "--amp", "off"]


@pytest.fixture
def city(make_cityscapes):
    return make_cityscapes(size=(32, 16), counts={"train": 8, "val": 4}, block=4, noise=10)


def tiny_args(data_root, run_dir, *extra):
    return ["--data_root", str(data_root), "--out_dir", str(run_dir), "--model_path", str(run_dir / "unet_model.pth"),
            *TINY, *extra]


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    return [r for r in parsed if "train_loss" in r], [r for r in parsed if "miou" in r]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)
