"""Cityscapes data: class table, dataset on the official folder layout, augmentation, visualisation,
and a CLI that prepares a downscaled copy once (`prepare`) or writes the synthetic city (`synth`).

The layout is exactly what leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip unzip to:
    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
Label ids map to train ids through torchvision's Cityscapes class table; every id that is not one of the
chosen classes (ego vehicle, rectification border, ...) becomes IGNORE_INDEX, so void never trains.
"""
import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

IGNORE_INDEX = 255
# ImageNet RGB statistics: the standard choice for natural photos, and what any pretrained encoder expects.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
MAX_LABEL_ID = 33  # official labelIds PNGs hold ids 0..33 ('license plate' has id -1 and never appears)


class DatasetError(ValueError):
    """Bad input data; the one-line message names the file and the problem. The single-argument
    constructor lets a DataLoader worker re-raise it in the main process (see one_line)."""


def one_line(error: BaseException) -> str:
    """An error's own message, for CLIs. A DataLoader worker's re-raise prefixes the message with the
    worker's traceback, whose last line is "module.ErrorType: message"; that message is kept."""
    message = str(error).strip()
    if "Traceback (most recent call last)" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


@dataclass(frozen=True)
class ClassTable:
    """The classes a model predicts: train id i has name names[i], Cityscapes label id label_ids[i] and
    palette colour colors[i]; label_to_train maps every label id (0..255) to its train id or IGNORE_INDEX."""

    names: list[str]
    colors: np.ndarray
    label_ids: list[int]
    label_to_train: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_names(cls, names=None) -> "ClassTable":
        """None -> the 19 official evaluation classes in train-id order; otherwise the given Cityscapes
        class names become train ids 0..C-1 in that order."""
        by_name = {c.name: c for c in Cityscapes.classes if c.id >= 0}
        if names is None:
            chosen = sorted((c for c in by_name.values() if not c.ignore_in_eval), key=lambda c: c.train_id)
        else:
            names = list(names)
            unknown = [name for name in names if name not in by_name]
            if unknown:
                raise ValueError(f"unknown Cityscapes class name(s) {unknown}; valid names: {', '.join(by_name)}")
            if not names or len(set(names)) != len(names):
                raise ValueError(f"class names must be a non-empty list without duplicates, got {names}")
            chosen = [by_name[name] for name in names]
        label_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for train_id, cityscapes_class in enumerate(chosen):
            label_to_train[cityscapes_class.id] = train_id
        return cls(
            names=[c.name for c in chosen],
            colors=np.array([c.color for c in chosen], dtype=np.uint8),
            label_ids=[c.id for c in chosen],
            label_to_train=label_to_train,
        )


def parse_size(text: str) -> tuple[int, int]:
    """'512x256' -> (512, 256), i.e. (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise ValueError(f"invalid size {text!r}: expected WIDTHxHEIGHT with positive integers, e.g. 512x256")
    return int(match[1]), int(match[2])


def size_arg(text: str) -> tuple[int, int]:
    """parse_size for argparse `type=`: its message reaches the user (argparse hides a ValueError's)."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _read_error(path, error: OSError) -> DatasetError:
    detail = "not an image file" if isinstance(error, UnidentifiedImageError) else (error.strerror or str(error))
    return DatasetError(f"{path}: cannot read PNG ({detail})")


def read_image(path) -> torch.Tensor:
    """RGB uint8 (3, H, W). Decoded with PIL: torchvision.io's decoder is ~15% faster but deprecated
    since torchvision 0.29 (superseded by TorchCodec, not a dependency of ours)."""
    try:
        with Image.open(path) as png:
            pixels = np.array(png.convert("RGB"))
    except OSError as error:
        raise _read_error(path, error) from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_mask(path) -> torch.Tensor:
    """Label PNG as uint8 (H, W); it must be single-channel 8-bit (mode L) like the official files."""
    try:
        with Image.open(path) as png:
            if png.mode != "L":
                raise DatasetError(f"{path}: expected a single-channel 8-bit label PNG (mode L), got mode {png.mode}")
            pixels = np.array(png)
    except OSError as error:
        raise _read_error(path, error) from None
    return torch.from_numpy(pixels)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    return F.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (the pixel-centre variant, as PIL does) so no label is ever invented by blending."""
    width, height = size
    return F.resize(mask[None], [height, width], interpolation=InterpolationMode.NEAREST_EXACT)[0]


def _check_root(root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    image_dir = root / "leftImg8bit" / split
    if not (root / "leftImg8bit").is_dir():
        raise DatasetError(f"{root}: not a Cityscapes root, no leftImg8bit/ folder (see Dataset/readme.md)")
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: split folder missing")
    return image_dir


def find_samples(root, split: str, mask_suffix: str = LABEL_ID_SUFFIX) -> list[tuple[Path, Path | None]]:
    """Sorted (image, mask) pairs matched by their {city}_{seq}_{frame} stem; other files are ignored.
    The test split has no public labels, so its masks are None."""
    root = Path(root)
    image_dir = _check_root(root, split)
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(f"{image_dir}: no {{city}}/*{IMAGE_SUFFIX} images")
    if split == "test":
        return [(image_path, None) for image_path in images]
    mask_dir = root / "gtFine" / split
    if not mask_dir.is_dir():
        raise DatasetError(f"{mask_dir}: split folder missing")
    samples = []
    for image_path in images:
        stem = image_path.name.removesuffix(IMAGE_SUFFIX)
        mask_path = mask_dir / image_path.parent.name / f"{stem}{mask_suffix}"
        if not mask_path.is_file():
            raise DatasetError(f"{mask_path}: missing mask for image {stem}")
        samples.append((image_path, mask_path))
    return samples


def has_cityscapes(root) -> bool:
    """True when root holds the official layout with train and val images and labels."""
    root = Path(root)
    return all(
        any((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))
        and any((root / "gtFine" / split).glob(f"*/*{LABEL_ID_SUFFIX}"))
        for split in ("train", "val")
    )


def build_transform(image_size, augment, scale_range=(0.5, 2.0), hflip_prob=0.5, color_jitter=0.2) -> v2.Compose:
    """Joint image/mask pipeline on tv_tensors (masks are resized nearest and never colour-jittered):
    random scale of the training size, random crop back to it (image padded 0, mask IGNORE_INDEX),
    flip, mild jitter; then float conversion and ImageNet normalisation (images only)."""
    width, height = image_size
    steps = []
    if augment:
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        short_side = min(width, height)
        steps += [
            v2.RandomResize(round(short_side * low), round(short_side * high) + 1, antialias=True),
            v2.RandomCrop((height, width), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(hflip_prob),
        ]
        if color_jitter > 0:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class CityscapesDataset(torch.utils.data.Dataset):
    """Cityscapes on the official layout. ds[i] -> (image float32 (3,H,W) normalised, mask int64 (H,W) of
    train ids with IGNORE_INDEX for void); the "test" split has no labels, so ds[i] -> image only.

    classes: None (the 19 evaluation classes), a list of Cityscapes class names, or a ClassTable.
    use_train_id_files: read the pre-made _gtFine_labelTrainIds.png files, which encode the 19 default
    classes only. Files whose size differs from image_size (width, height) are resized on the fly;
    run `python dataset.py prepare` once so they are not.
    """

    def __init__(self, root, split="train", image_size=(512, 256), classes=None, augment=False,
                 use_train_id_files=False, scale_range=(0.5, 2.0), hflip_prob=0.5, color_jitter=0.2):
        self.root = Path(root)
        self.split = split
        self.image_size = tuple(image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (width, height) of positive ints, got {image_size}")
        self.class_table = classes if isinstance(classes, ClassTable) else ClassTable.from_names(classes)
        self.has_labels = split != "test"
        if augment and not self.has_labels:
            raise DatasetError(f"split {split!r} has no labels, so it cannot be augmented (use it for inference only)")
        if use_train_id_files:
            if self.class_table.label_ids != ClassTable.from_names().label_ids:
                raise DatasetError("use_train_id_files needs the default 19 classes: labelTrainIds files encode only those")
            # Train-id files already hold 0..18 and 255; anything else is corrupt.
            self.lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
            self.lut[: self.class_table.num_classes] = np.arange(self.class_table.num_classes)
            self.valid_values = np.zeros(256, dtype=bool)
            self.valid_values[: self.class_table.num_classes] = True
            self.valid_values[IGNORE_INDEX] = True
            self.valid_description = f"train ids 0..{self.class_table.num_classes - 1} or {IGNORE_INDEX}"
        else:
            self.lut = self.class_table.label_to_train
            self.valid_values = np.arange(256) <= MAX_LABEL_ID
            self.valid_description = f"label ids 0..{MAX_LABEL_ID}"
        self.samples = find_samples(self.root, split, TRAIN_ID_SUFFIX if use_train_id_files else LABEL_ID_SUFFIX)
        self.transform = build_transform(self.image_size, augment, scale_range, hflip_prob, color_jitter)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, mask = self.read_sample(index)
        if mask is None:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def read_sample(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image uint8 (3,H,W), train ids uint8 (H,W) or None on the test split) at image_size, before the
        transform: what every item starts from, and what DeviceCache keeps."""
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        size_on_disk = (image.shape[2], image.shape[1])
        if size_on_disk != self.image_size:
            image = resize_image(image, self.image_size)
        if mask_path is None:
            return image, None
        return image, self.load_train_ids(mask_path, size_on_disk, image_path)

    def load_train_ids(self, mask_path, image_size_on_disk, image_path) -> torch.Tensor:
        """uint8 (H, W) train ids at self.image_size, checked against the image and the valid label values."""
        mask = read_mask(mask_path).numpy()
        mask_size = (mask.shape[1], mask.shape[0])
        if mask_size != image_size_on_disk:
            raise DatasetError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but image {image_path.name} "
                               f"is {image_size_on_disk[0]}x{image_size_on_disk[1]}")
        if not self.valid_values[mask].all():
            bad = np.unique(mask[~self.valid_values[mask]])
            raise DatasetError(f"{mask_path}: invalid mask values {bad.tolist()[:10]}, expected {self.valid_description}")
        train_ids = torch.from_numpy(self.lut[mask])
        if mask_size != self.image_size:
            train_ids = resize_mask(train_ids, self.image_size)
        return train_ids


class DeviceCache:
    """A labelled split as uint8 tensors on one device, served as augmented batches made there.

    For prepared data that fits in device memory (Cityscapes train at 512x256 is 2975 * 512 * 256 * 4 bytes
    = 1.6 GB): files are decoded once, and each batch is one gather, one affine_grid with two grid_samples
    and a few element-wise ops, so the input pipeline costs ~0 next to the model.

    batch(indices, sample_seeds, augment) -> (normalised float32 (B,3,H,W), int64 train ids (B,H,W)).
    Without augmentation the items equal the dataset's un-augmented ones exactly. With it, each sample's
    parameters come from a CPU generator seeded by its own seed, so augmentation stays a pure function of
    (seed, epoch, index). The distributions match build_transform's, not its exact pixels: a uniform scale
    in scale_range (torchvision draws the integer short side; the same range), a uniform crop back to
    image_size (image padded 0, mask IGNORE_INDEX where the scaled image is smaller), a flip with
    hflip_prob and brightness, contrast and saturation factors uniform in [1 - j, 1 + j]. Differences:
    downscaling is bilinear without antialiasing, crop offsets are sub-pixel, and jitter applies its
    three factors in this fixed order on float pixels (torchvision shuffles them and rounds to uint8).
    """

    def __init__(self, dataset: CityscapesDataset, device="cpu", scale_range=(0.5, 2.0), hflip_prob=0.5,
                 color_jitter=0.2, num_workers=0):
        if not dataset.has_labels:
            raise DatasetError(f"split {dataset.split!r} has no labels, so it cannot be cached for training")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.device = torch.device(device)
        self.scale_range, self.hflip_prob, self.color_jitter = tuple(scale_range), hflip_prob, color_jitter
        width, height = dataset.image_size
        self.images = torch.empty(len(dataset), 3, height, width, dtype=torch.uint8, device=self.device)
        self.masks = torch.empty(len(dataset), height, width, dtype=torch.uint8, device=self.device)
        # batch_size=None hands each index to collate_fn alone, so the workers decode one sample each
        samples = torch.utils.data.DataLoader(range(len(dataset)), batch_size=None, num_workers=num_workers,
                                              collate_fn=dataset.read_sample)
        for index, (image, mask) in enumerate(samples):
            self.images[index] = image
            self.masks[index] = mask

    def __len__(self):
        return len(self.images)

    def to_device(self, tensor) -> torch.Tensor:
        """A small CPU tensor to the cache's device without waiting for the GPU: a copy from pageable
        memory would synchronise with the stream, so on CUDA it goes through pinned memory."""
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def batch(self, indices, sample_seeds, augment=True) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.to_device(torch.as_tensor(list(indices)))
        images = F.to_dtype(self.images[rows], torch.float32, scale=True)
        masks = self.masks[rows]
        if augment:
            images, masks = self.augment(images, masks, sample_seeds)
        return F.normalize(images, MEAN, STD), masks.long()

    def draw_parameters(self, sample_seeds) -> torch.Tensor:
        """(B, 7) float64 on the CPU: per sample, uniform draws for scale, crop x, crop y, flip, brightness,
        contrast and saturation from a generator seeded by that sample's seed alone."""
        return torch.stack([torch.rand(7, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
                            for seed in sample_seeds])

    def augment(self, images, masks, sample_seeds):
        """Scale, crop and flip as one sampling grid per sample (output pixel -> source pixel, in
        grid_sample's normalised coordinates), then colour jitter; float images in [0, 1], uint8 masks."""
        draws = self.draw_parameters(sample_seeds)
        low, high = self.scale_range
        scale = low + (high - low) * draws[:, 0]
        # the crop window's top-left corner in the scaled image, as a fraction of the output size: inside
        # it when the scaled image is larger, a negative offset (padding before it) when it is smaller
        shift = scale - 1
        crop_x = shift.clamp(max=0) + draws[:, 1] * shift.abs()
        crop_y = shift.clamp(max=0) + draws[:, 2] * shift.abs()
        mirror = torch.where(draws[:, 3] < self.hflip_prob, -1.0, 1.0)
        theta = torch.zeros(len(scale), 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = mirror / scale
        theta[:, 0, 2] = (1 + 2 * crop_x) / scale - 1
        theta[:, 1, 1] = 1 / scale
        theta[:, 1, 2] = (1 + 2 * crop_y) / scale - 1
        theta = self.to_device(theta.float())
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                                 align_corners=False)
        # labels shifted by one so that zero padding marks pixels outside the scaled image
        shifted = torch.nn.functional.grid_sample(masks[:, None].float() + 1, grid, mode="nearest",
                                                  padding_mode="zeros", align_corners=False)[:, 0]
        masks = torch.where(shifted == 0, IGNORE_INDEX, shifted - 1).to(torch.uint8)
        if self.color_jitter > 0:
            factors = (1 + self.color_jitter * (2 * draws[:, 4:] - 1)).clamp(min=0).view(-1, 3, 1, 1, 1)
            images = jitter(images, *self.to_device(factors.float()).unbind(1))
        return images, masks


def jitter(images, brightness, contrast, saturation) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation blends on float images (B,3,H,W) in [0, 1], with
    per-sample factors (B,1,1,1)."""
    images = (images * brightness).clamp(0, 1)
    mean = F.rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    images = (contrast * images + (1 - contrast) * mean).clamp(0, 1)
    return (saturation * images + (1 - saturation) * F.rgb_to_grayscale(images)).clamp(0, 1)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised float (3, H, W) -> uint8 (H, W, 3), the inverse of the dataset's normalisation."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def _as_numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)


def colorize(mask, colors) -> np.ndarray:
    """Train-id mask (H, W) -> uint8 (H, W, 3) palette image; ignored / unknown ids are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = colors
    return palette[_as_numpy(mask).astype(np.int64).clip(0, 255)]


def overlay(image_uint8, mask, colors, alpha=0.5) -> np.ndarray:
    """Blend the class colours over the image; ignored pixels keep the image."""
    image = _as_numpy(image_uint8).astype(np.float32)
    mask = _as_numpy(mask)
    blended = (1 - alpha) * image + alpha * colorize(mask, colors)
    labelled = (mask != IGNORE_INDEX)[..., None]
    return np.where(labelled, blended, image).round().astype(np.uint8)


def legend_image(class_table: ClassTable, row_height=20, width=200) -> np.ndarray:
    """uint8 (C * row_height, width, 3): one row per class, colour swatch then name."""
    legend = Image.new("RGB", (width, row_height * class_table.num_classes), "white")
    draw = ImageDraw.Draw(legend)
    for train_id, (name, color) in enumerate(zip(class_table.names, class_table.colors)):
        top = train_id * row_height
        draw.rectangle([2, top + 2, 2 * row_height, top + row_height - 3], fill=tuple(int(c) for c in color))
        draw.text((2 * row_height + 6, top + 4), f"{train_id} {name}", fill="black")
    return np.array(legend)


def save_prediction_grid(path, images_uint8, gt_masks, pred_masks, class_table: ClassTable):
    """PNG with one row per sample: image | ground truth | prediction, and a legend of the classes shown."""
    if not len(images_uint8) == len(gt_masks) == len(pred_masks) > 0:
        raise ValueError(f"need equally many images, ground truths and predictions (>0), got "
                         f"{len(images_uint8)}, {len(gt_masks)}, {len(pred_masks)}")
    rows = len(images_uint8)
    height, width = _as_numpy(images_uint8[0]).shape[:2]
    figure = Figure(figsize=(9, 3 * rows * height / width + 1), layout="constrained")
    axes = figure.subplots(rows, 3, squeeze=False)
    shown = set()
    for row, (image, gt, pred) in enumerate(zip(images_uint8, gt_masks, pred_masks)):
        gt, pred = _as_numpy(gt), _as_numpy(pred)
        shown |= set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())
        panels = (_as_numpy(image), colorize(gt, class_table.colors), colorize(pred, class_table.colors))
        for axis, picture, title in zip(axes[row], panels, ("image", "ground truth", "prediction")):
            axis.imshow(picture, interpolation="nearest")
            axis.set_axis_off()
            if row == 0:
                axis.set_title(title)
    handles = [Patch(color=class_table.colors[i] / 255, label=class_table.names[i])
               for i in sorted(shown) if i < class_table.num_classes]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize="small")
    figure.savefig(path, dpi=100)


class PrepareJob(NamedTuple):
    source: Path
    target: Path
    is_label: bool


def write_image_atomically(path, pixels: np.ndarray, image_format="PNG", **save_options):
    """Save with PIL to a temp name in the same folder, then rename: an interrupted run never leaves a
    half-written file, and a symlink at `path` is replaced, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(pixels).save(temp_path, format=image_format, **save_options)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def prepare_file(job: PrepareJob, size: tuple[int, int]):
    """Downscale one file: images antialiased bilinear, label PNGs nearest."""
    if job.is_label:
        pixels = resize_mask(read_mask(job.source), size).numpy()
    else:
        pixels = resize_image(read_image(job.source), size).permute(1, 2, 0).numpy()
    write_image_atomically(job.target, pixels)


def _is_prepared(path: Path, size: tuple[int, int]) -> bool:
    """Finished outputs are skipped; a file of another size is never overwritten."""
    if not path.exists():
        return False
    with Image.open(path) as existing:
        if existing.size != tuple(size):
            raise DatasetError(f"{path}: already exists with size {existing.size[0]}x{existing.size[1]}, "
                               f"not {size[0]}x{size[1]}; use another --dst")
    return True


def _single_threaded_worker():
    torch.set_num_threads(1)  # one process per core already; intra-op threads would only oversubscribe


def prepare(src, dst, size=(512, 256), workers=None) -> tuple[int, int]:
    """Write a downscaled copy of the Cityscapes tree at src into dst (same layout), over `workers`
    processes (default: all cores). Idempotent and resumable. Returns (files written, files skipped)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise DatasetError(f"{src}: source root not found")
    if not (src / "leftImg8bit").is_dir():
        raise DatasetError(f"{src}: not a Cityscapes root, no leftImg8bit/ folder (see Dataset/readme.md)")
    if dst == src or src in dst.parents:
        raise DatasetError(f"{dst}: destination must lie outside the source {src} (raw data is never modified)")
    jobs = [PrepareJob(path, dst / path.relative_to(src), False) for path in sorted(src.glob(f"leftImg8bit/*/*/*{IMAGE_SUFFIX}"))]
    for suffix in (LABEL_ID_SUFFIX, TRAIN_ID_SUFFIX):
        jobs += [PrepareJob(path, dst / path.relative_to(src), True) for path in sorted(src.glob(f"gtFine/*/*/*{suffix}"))]
    if not jobs:
        raise DatasetError(f"{src}: no leftImg8bit/{{split}}/{{city}}/*{IMAGE_SUFFIX} images")
    for stale_temp in dst.glob("*/*/*/.*.tmp"):  # left by a killed run
        stale_temp.unlink()
    pending = [job for job in jobs if not _is_prepared(job.target, size)]
    convert = partial(prepare_file, size=size)
    workers = min(workers or os.cpu_count(), max(len(pending), 1))
    progress = tqdm(total=len(pending), desc=f"prepare {size[0]}x{size[1]}", unit="file")
    if workers <= 1:
        for job in pending:
            convert(job)
            progress.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_single_threaded_worker) as pool:
            for _ in pool.map(convert, pending, chunksize=8):
                progress.update()
    progress.close()
    return len(pending), len(jobs) - len(pending)


def synth(out, num_train, num_val, size, seed, workers, num_test):
    # Imported here so that loading real data never needs the generator module.
    import synthetic_city

    synthetic_city.generate(out, num_train, num_val, size=size, seed=seed, workers=workers, num_test=num_test)
    print(f"{out}: synthetic city of {num_train} train, {num_val} val, {num_test} test images at {size[0]}x{size[1]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare Cityscapes data or write the synthetic city.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write a downscaled copy of a Cityscapes tree")
    prepare_parser.add_argument("--src", required=True, help="unzipped official release (leftImg8bit/, gtFine/)")
    prepare_parser.add_argument("--dst", required=True, help="output root, same layout")
    prepare_parser.add_argument("--size", type=size_arg, default=(512, 256), help="WIDTHxHEIGHT (default 512x256)")
    prepare_parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth_parser = commands.add_parser("synth", help="write the synthetic Cityscapes-format city")
    synth_parser.add_argument("--out", default="Dataset/synthetic", help="output root (default Dataset/synthetic)")
    synth_parser.add_argument("--train", type=int, required=True, help="number of train images (the demo: 300)")
    synth_parser.add_argument("--val", type=int, required=True, help="number of val images (the demo: 60)")
    synth_parser.add_argument("--test", type=int, default=0, help="number of (unlabelled) test images (default 0)")
    synth_parser.add_argument("--size", type=size_arg, default=(128, 64),
                              help="WIDTHxHEIGHT (default 128x64, the training demo's size)")
    synth_parser.add_argument("--seed", type=int, default=0, help="scenes are a pure function of it (default 0)")
    synth_parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            written, skipped = prepare(args.src, args.dst, args.size, args.workers)
            print(f"{args.dst}: wrote {written} files, skipped {skipped} already prepared")
        else:
            synth(args.out, args.train, args.val, args.size, args.seed, args.workers, args.test)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
