"""Segmentation data on disk: three folder layouts, their class tables, reading and checking files, the
augmentation, `python dataset.py prepare` (a downscaled copy of any layout, made once) and
`python dataset.py holdout` (a CamVid copy whose val is a whole drive that train never sees).

Layouts, each read exactly as it is distributed (`open_layout` recognises them):
- cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_labelIds.png,
  label ids mapped to train ids through torchvision's Cityscapes class table.
- camvid: the SegNet tutorial's CamVid/ folder, {split}/NAME.png + {split}annot/NAME.png, values 0-10 the
  classes and 11 void.
- folder: your own data, classes.txt + images/{split}/NAME.EXT + masks/{split}/NAME.png, index or colour masks.
Every value that is not a chosen class (void, ego vehicle, an unselected class) becomes IGNORE_INDEX, which
the loss and the metrics ignore, so void is never learnt as a class.
"""
import argparse
import colorsys
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from runtime import DEFAULT_IMAGE_SIZE, UserError, remove_stale_temp_files, run_cli, size_arg, write_image_atomically

IGNORE_INDEX = 255
# ImageNet RGB statistics: the standard choice for natural photos, and what any pretrained encoder expects.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
# Photo formats only: a mislabelled file never reaches an exotic decoder (Pillow's EPS plugin runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
IMAGE_SUFFIXES = {ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS}


class DatasetError(UserError):
    """Bad input data; the one-line message names the file and the problem."""


CITYSCAPES_NAMES = [c.name for c in Cityscapes.classes if c.id >= 0]
CITYSCAPES_EVAL_NAMES = [c.name for c in sorted(Cityscapes.classes, key=lambda c: c.train_id)
                         if c.id >= 0 and not c.ignore_in_eval]


# ----------------------------------------------------------------------------- class tables

@dataclass(frozen=True)
class ClassTable:
    """The classes a model predicts: class i has name names[i] and palette colour colors[i].
    label_to_train maps every raw mask value (0..255) to its class or IGNORE_INDEX; `valid` marks the raw
    values a mask may hold at all. label_ids: the Cityscapes label id of each class (Cityscapes only)."""

    names: list
    colors: np.ndarray
    label_to_train: np.ndarray
    valid: np.ndarray
    valid_description: str
    label_ids: list | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def select(cls, catalogue, names, default_names, valid, valid_description, dataset_name, label_ids=False):
        """Classes 0..C-1 = `names` (default: default_names) in that order, looked up in `catalogue`
        ({name: (raw value, colour)}); every other raw value maps to IGNORE_INDEX."""
        names = list(default_names if names is None else names)
        unknown = [name for name in names if name not in catalogue]
        if unknown:
            raise DatasetError(f"unknown {dataset_name} class name(s) {unknown}; valid names: {', '.join(catalogue)}")
        if not names or len(set(names)) != len(names):
            raise DatasetError(f"class names must be a non-empty list without duplicates, got {names}")
        label_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for index, name in enumerate(names):
            label_to_train[catalogue[name][0]] = index
        return cls(names, np.array([catalogue[name][1] for name in names], dtype=np.uint8), label_to_train, valid,
                   valid_description, [catalogue[name][0] for name in names] if label_ids else None)

    @classmethod
    def from_names(cls, names=None) -> "ClassTable":
        """Cityscapes classes by name (torchvision's table); None -> the 19 evaluation classes in train-id order."""
        catalogue = {c.name: (c.id, c.color) for c in Cityscapes.classes if c.id >= 0}
        return cls.select(catalogue, names, CITYSCAPES_EVAL_NAMES, np.arange(256) <= MAX_LABEL_ID,
                          f"label ids 0..{MAX_LABEL_ID}", "Cityscapes", label_ids=True)


def default_palette(count, avoid=()):
    """`count` distinct colours for classes without one (evenly spread hues), never one of `avoid`."""
    colors, taken, hue = [], {tuple(color) for color in avoid}, 0.0
    while len(colors) < count:
        value = 0.9 - 0.25 * (len(colors) // 12 % 2)
        color = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1, 0.8, value))
        hue += 0.618034  # golden-ratio steps keep neighbouring classes apart
        if color not in taken:
            colors.append(color)
            taken.add(color)
    return colors


# ----------------------------------------------------------------------------- reading files

def _read_error(path, error: Exception) -> DatasetError:
    if isinstance(error, Image.UnidentifiedImageError):
        detail = "not an image file"
    elif isinstance(error, OSError) and error.strerror:
        detail = error.strerror
    else:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    kind = Path(path).suffix.lstrip(".").upper() or "image"
    return DatasetError(f"{path}: cannot read {kind} ({detail})")


def photo_to_rgb(image) -> np.ndarray:
    """A PIL image or a numpy array ((H, W) gray, (H, W, 3) RGB, (H, W, 4) RGBA) -> uint8 RGB (H, W, 3) as
    displayed: EXIF orientation applied, 16-bit scaled to 8 bits (x / 257, not clipped), transparency
    composited over white."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise UserError(f"expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(image)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grayscale (I;16*) or 32-bit I
        gray = np.asarray(image).astype(np.float32) / 257
        image = Image.fromarray(gray.round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def read_photo(path) -> np.ndarray:
    """Any supported image file -> uint8 RGB (H, W, 3) as displayed (see photo_to_rgb)."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.load()
            return photo_to_rgb(image)
    # Pillow reports malformed files through many types (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError, ...): all mean "this file cannot be read"
    except Exception as error:
        raise _read_error(path, error) from None


def read_image(path) -> torch.Tensor:
    """RGB uint8 (3, H, W), as read_photo reads it."""
    return torch.from_numpy(read_photo(path).copy()).permute(2, 0, 1)


def read_label_png(path, modes=("L",)) -> np.ndarray:
    """A mask PNG's pixels: (H, W) values for modes L and P (P read as its palette indices), (H, W, 3) for RGB."""
    try:
        with Image.open(path, formats=("PNG",)) as png:
            if png.mode not in modes:
                kinds = {"L": "a single-channel 8-bit label PNG (mode L)", "P": "a palette PNG (mode P)",
                         "RGB": "an RGB PNG", "RGBA": "an RGBA PNG"}
                raise DatasetError(f"{path}: expected {' or '.join(kinds[mode] for mode in modes)}, got mode {png.mode}")
            return np.array(png)
    except DatasetError:
        raise
    except Exception as error:
        raise _read_error(path, error) from None


def read_mask(path) -> torch.Tensor:
    """A single-channel 8-bit label PNG as uint8 (H, W)."""
    return torch.from_numpy(read_label_png(path))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    return F.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (the pixel-centre variant, as PIL does) so no label is ever invented by blending."""
    width, height = size
    return F.resize(mask[None], [height, width], interpolation=InterpolationMode.NEAREST_EXACT)[0]


def image_files(folder: Path) -> dict:
    """{NAME: path} of the image files in a folder (any letter case of the suffix; hidden files skipped);
    two images with the same NAME are an error."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise DatasetError(f"{path}: two images named {path.stem} ({found[path.stem].name} and {path.name}); "
                                   f"masks are matched by name, so names must be unique")
            found[path.stem] = path
    return found


def split_folder(path: Path) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: split folder missing")
    return path


def pair_by_name(image_dir: Path, mask_dir: Path, labels_optional=False):
    """(image, mask) pairs of the images in image_dir and their masks mask_dir/NAME.png, sorted by NAME; with
    labels_optional and no mask_dir, the masks are None. An image without its mask is an error, a mask
    without an image a warning."""
    images = image_files(split_folder(image_dir))
    if not images:
        raise DatasetError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if labels_optional and not mask_dir.is_dir():
        return [(path, None) for path in images.values()]
    for mask_path in sorted(split_folder(mask_dir).glob("*.png")):
        if mask_path.stem not in images:
            print(f"warning: {mask_path}: no image named {mask_path.stem} in {image_dir}; mask ignored", file=sys.stderr)
    pairs = []
    for name, image_path in images.items():
        mask_path = mask_dir / f"{name}.png"
        if not mask_path.is_file():
            raise DatasetError(f"{mask_path}: missing mask for image {image_path.name}")
        pairs.append((image_path, mask_path))
    return pairs


# ----------------------------------------------------------------------------- layouts

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
MAX_LABEL_ID = 33  # official labelIds PNGs hold ids 0..33 ('license plate' has id -1 and never appears)


class CityscapesLayout:
    """Cityscapes as leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip unzip (the synthetic city too).
    train_id_files: read the official _gtFine_labelTrainIds.png masks (the 19 default classes only)."""

    kind = "cityscapes"

    def __init__(self, root, train_id_files=False):
        self.root, self.train_id_files = Path(root), train_id_files
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root not found")
        if not (self.root / "leftImg8bit").is_dir():
            raise DatasetError(f"{self.root}: not a Cityscapes root, no leftImg8bit/ folder (see Dataset/readme.md)")

    @staticmethod
    def detect(root: Path) -> bool:
        return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()

    def samples(self, split):
        """Sorted (image, mask) pairs matched by their {city}_{seq}_{frame} stem; other files are ignored.
        The test split has no public labels, so its masks are None."""
        image_dir = split_folder(self.root / "leftImg8bit" / split)
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(f"{image_dir}: no {{city}}/*{IMAGE_SUFFIX} images")
        if split == "test":
            return [(image_path, None) for image_path in images]
        mask_dir = split_folder(self.root / "gtFine" / split)
        suffix = TRAIN_ID_SUFFIX if self.train_id_files else LABEL_ID_SUFFIX
        pairs = []
        for image_path in images:
            stem = image_path.name.removesuffix(IMAGE_SUFFIX)
            mask_path = mask_dir / image_path.parent.name / f"{stem}{suffix}"
            if not mask_path.is_file():
                raise DatasetError(f"{mask_path}: missing mask for image {stem}")
            pairs.append((image_path, mask_path))
        return pairs

    def class_table(self, names=None) -> ClassTable:
        table = ClassTable.from_names(names)
        if not self.train_id_files:
            return table
        if table.label_ids != ClassTable.from_names().label_ids:
            raise DatasetError("--train_id_files needs the default 19 classes: labelTrainIds files encode only those")
        valid = np.zeros(256, dtype=bool)
        valid[: table.num_classes] = valid[IGNORE_INDEX] = True
        label_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        label_to_train[: table.num_classes] = np.arange(table.num_classes)
        return ClassTable(table.names, table.colors, label_to_train, valid,
                          f"train ids 0..{table.num_classes - 1} or {IGNORE_INDEX}", table.label_ids)

    def read_mask(self, path) -> np.ndarray:
        return read_label_png(path)

    def files_to_prepare(self):
        """(path, is_mask) of every file `prepare` converts: the images and both kinds of label PNG."""
        files = [(path, False) for path in sorted(self.root.glob(f"leftImg8bit/*/*/*{IMAGE_SUFFIX}"))]
        for suffix in (LABEL_ID_SUFFIX, TRAIN_ID_SUFFIX):
            files += [(path, True) for path in sorted(self.root.glob(f"gtFine/*/*/*{suffix}"))]
        if not files:
            raise DatasetError(f"{self.root}: no leftImg8bit/{{split}}/{{city}}/*{IMAGE_SUFFIX} images")
        return files


# CamVid's 11 classes as the SegNet tutorial labels them: (name, mask value, colour); value 11 is void.
CAMVID_CLASSES = [("Sky", 0, (128, 128, 128)), ("Building", 1, (128, 0, 0)), ("Pole", 2, (192, 192, 128)),
                  ("Road", 3, (128, 64, 128)), ("Pavement", 4, (60, 40, 222)), ("Tree", 5, (128, 128, 0)),
                  ("SignSymbol", 6, (192, 128, 128)), ("Fence", 7, (64, 64, 128)), ("Car", 8, (64, 0, 128)),
                  ("Pedestrian", 9, (64, 64, 0)), ("Bicyclist", 10, (0, 128, 192))]
CAMVID_VOID = 11


class CamVidLayout:
    """CamVid as the SegNet tutorial distributes it: {split}/NAME.png photos, {split}annot/NAME.png masks."""

    kind = "camvid"

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root not found")

    @staticmethod
    def detect(root: Path) -> bool:
        return (root / "train").is_dir() and (root / "trainannot").is_dir()

    def samples(self, split):
        return pair_by_name(self.root / split, self.root / f"{split}annot", labels_optional=split == "test")

    def class_table(self, names=None) -> ClassTable:
        catalogue = {name: (value, color) for name, value, color in CAMVID_CLASSES}
        valid = np.arange(256) <= CAMVID_VOID
        return ClassTable.select(catalogue, names, list(catalogue), valid, f"0..{CAMVID_VOID - 1} or {CAMVID_VOID} "
                                 f"(void)", "CamVid")

    def read_mask(self, path) -> np.ndarray:
        return read_label_png(path, modes=("L", "P"))

    def files_to_prepare(self):
        return paired_files(self, [split for split in SPLITS if (self.root / split).is_dir()])


class FolderLayout:
    """Your own data: ROOT/classes.txt, ROOT/images/{split}/NAME.EXT, ROOT/masks/{split}/NAME.png.

    classes.txt has one class per line, in index order: `NAME [R G B]` (a name may hold spaces; blank lines
    and # comments are skipped); the reserved name `void` gives the colour of ignored pixels in RGB masks.
    Masks hold class indices (mode L, or P read as its indices) with 255 = void, or the classes' colours (RGB).
    """

    kind = "folder"
    CLASSES_FILE = "classes.txt"

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root not found")
        self.names, self.colors, self.void_color = self.read_classes(self.root / self.CLASSES_FILE)
        # RGB masks: colour (as one 24-bit integer) -> class index, the void colour -> IGNORE_INDEX
        codes = {rgb_code(color): index for index, color in enumerate(self.colors)}
        if self.void_color is not None:
            codes[rgb_code(self.void_color)] = IGNORE_INDEX
        self.color_codes = np.array(sorted(codes), dtype=np.int64)
        self.color_values = np.array([codes[code] for code in sorted(codes)], dtype=np.uint8)

    @staticmethod
    def detect(root: Path) -> bool:
        return (root / FolderLayout.CLASSES_FILE).is_file() or ((root / "images").is_dir() and (root / "masks").is_dir())

    @staticmethod
    def read_classes(path: Path):
        """(names, colours, void colour or None) from classes.txt; classes without a colour get the default palette."""
        if not path.is_file():
            raise DatasetError(f"{path}: missing (one class per line, in index order: NAME [R G B])")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise _read_error(path, error) from None
        names, colors, void_color = [], [], None
        for number, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            color, numbers = None, 0
            while numbers < len(words) and re.fullmatch(r"\d+", words[-1 - numbers]):
                numbers += 1
            if numbers in (1, 2) or numbers == len(words):
                raise DatasetError(f"{path}, line {number}: {line.split('#')[0].strip()!r}: expected a class name, "
                                   f"then optionally its colour as three numbers R G B")
            if numbers:
                color, words = tuple(int(word) for word in words[-3:]), words[:-3]
                if max(color) > 255:
                    raise DatasetError(f"{path}, line {number}: colour {color} is not R G B in 0..255")
            name = " ".join(words)
            if name.lower() == "void":
                void_color = color
                continue
            if name in names:
                raise DatasetError(f"{path}, line {number}: class {name!r} is listed twice")
            names.append(name)
            colors.append(color)
        if not names:
            raise DatasetError(f"{path}: no classes (one class per line, in index order: NAME [R G B])")
        if len(names) > IGNORE_INDEX:
            raise DatasetError(f"{path}: {len(names)} classes, at most {IGNORE_INDEX} (mask value 255 is void)")
        given = [color for color in colors + [void_color] if color is not None]
        duplicates = sorted({color for color in given if given.count(color) > 1})
        if duplicates:
            raise DatasetError(f"{path}: colour {duplicates[0]} is given to two entries; RGB masks could not tell them apart")
        palette = iter(default_palette(colors.count(None), avoid=given))
        return names, [color if color is not None else next(palette) for color in colors], void_color

    def samples(self, split):
        return pair_by_name(self.root / "images" / split, self.root / "masks" / split, labels_optional=split == "test")

    def class_table(self, names=None) -> ClassTable:
        catalogue = {name: (index, color) for index, (name, color) in enumerate(zip(self.names, self.colors))}
        valid = np.zeros(256, dtype=bool)
        valid[: len(self.names)] = valid[IGNORE_INDEX] = True
        return ClassTable.select(catalogue, names, self.names, valid,
                                 f"class indices 0..{len(self.names) - 1} or {IGNORE_INDEX} (void)", "folder")

    def read_mask(self, path) -> np.ndarray:
        """Raw values: class indices (IGNORE_INDEX for void) from an index or a colour mask."""
        pixels = read_label_png(path, modes=("L", "P", "RGB", "RGBA"))
        if pixels.ndim == 2:
            return pixels
        codes = rgb_code(pixels[..., :3])
        position = np.searchsorted(self.color_codes, codes).clip(max=len(self.color_codes) - 1)
        known = self.color_codes[position] == codes
        if not known.all():
            unknown = [tuple(int(c) for c in divmod_rgb(code)) for code in np.unique(codes[~known])[:3]]
            raise DatasetError(f"{path}: colours not in {self.CLASSES_FILE}: {', '.join(map(str, unknown))}"
                               f"{' ...' if len(np.unique(codes[~known])) > 3 else ''}")
        return self.color_values[position]

    def files_to_prepare(self):
        return paired_files(self, [split for split in SPLITS if (self.root / "images" / split).is_dir()])


def paired_files(layout, splits):
    """(path, is_mask) of every image and mask of the splits: what `prepare` converts for a paired layout."""
    return [(path, is_mask) for split in splits for pair in layout.samples(split)
            for path, is_mask in zip(pair, (False, True)) if path is not None]


def rgb_code(pixels) -> np.ndarray:
    """RGB (..., 3) -> one integer per colour, r * 65536 + g * 256 + b."""
    pixels = np.asarray(pixels, dtype=np.int64)
    return (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]


def divmod_rgb(code):
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


LAYOUTS = {layout.kind: layout for layout in (CityscapesLayout, CamVidLayout, FolderLayout)}


def no_dataset_error(root) -> DatasetError:
    if not Path(root).is_dir():
        return DatasetError(f"{root}: dataset root not found")
    return DatasetError(f"{root}: no dataset here (Cityscapes: leftImg8bit/ and gtFine/; CamVid: train/ and trainannot/; "
                        f"your own: classes.txt, images/ and masks/; see Dataset/readme.md)")


def detect_layout(root) -> str | None:
    """The kind of layout at root (cityscapes, camvid, folder), or None."""
    root = Path(root)
    return next((kind for kind, layout in LAYOUTS.items() if root.is_dir() and layout.detect(root)), None)


def open_layout(root, kind="auto", train_id_files=False):
    """The layout at root; kind "auto" recognises it, any other kind forces it."""
    root = Path(root)
    if kind == "auto":
        kind = detect_layout(root)
        if kind is None:
            raise no_dataset_error(root)
    if train_id_files and kind != "cityscapes":
        raise DatasetError(f"--train_id_files: {root} is a {kind} dataset; the option is for Cityscapes only")
    return CityscapesLayout(root, train_id_files) if kind == "cityscapes" else LAYOUTS[kind](root)


def has_cityscapes(root) -> bool:
    """True when root holds the official layout with train and val images and labels."""
    root = Path(root)
    return all(any((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))
               and any((root / "gtFine" / split).glob(f"*/*{LABEL_ID_SUFFIX}")) for split in ("train", "val"))


# ----------------------------------------------------------------------------- the dataset

def check_augmentation(scale_range=(1.0, 1.0), paste_prob=0.0):
    """The augmentation ranges that the loader and the device cache both accept."""
    if not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    if not 0 <= paste_prob <= 1:
        raise ValueError(f"paste_prob must be in [0, 1], got {paste_prob}")


def build_transform(image_size, augment, scale_range=(0.5, 2.0), hflip_prob=0.5, color_jitter=0.2, mean=MEAN,
                    std=STD, crop_size=None) -> v2.Compose:
    """Joint image/mask pipeline on tv_tensors (masks are resized nearest and never colour-jittered):
    random scale of the image at image_size, random crop of crop_size (default: image_size; image padded 0,
    mask IGNORE_INDEX), flip, mild jitter; then float conversion and ImageNet normalisation (images only)."""
    width, height = image_size
    crop_width, crop_height = crop_size or image_size
    steps = []
    if augment:
        check_augmentation(scale_range)
        low, high = scale_range
        short_side = min(width, height)
        steps += [
            v2.RandomResize(round(short_side * low), round(short_side * high) + 1, antialias=True),
            v2.RandomCrop((crop_height, crop_width), pad_if_needed=True,
                          fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(hflip_prob),
        ]
        if color_jitter > 0:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def paste(image, mask, donor_image, donor_mask, classes: torch.Tensor, mirrored=False):
    """Copy-paste (Ghiasi et al. 2021): the donor's pixels of `classes` replace the image's and the mask's where
    they lie (the donor mirrored first if asked), so a rare object is seen in front of new surroundings.
    uint8 (..., 3, H, W) images and (..., H, W) masks; mirrored may be a bool tensor (...) per sample."""
    mirrored = torch.as_tensor(mirrored)
    donor_image = torch.where(mirrored[..., None, None, None], donor_image.flip(-1), donor_image)
    donor_mask = torch.where(mirrored[..., None, None], donor_mask.flip(-1), donor_mask)
    is_pasted = torch.zeros(256, dtype=torch.bool, device=donor_mask.device)  # a lookup: isin may sync a GPU
    is_pasted[classes.to(donor_mask.device, torch.long)] = True
    pasted = is_pasted[donor_mask.long()]
    return torch.where(pasted.unsqueeze(-3), donor_image, image), torch.where(pasted, donor_mask, mask)


def to_model_input(image: torch.Tensor, image_size, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 (3, H, W) photo -> normalised float (3, h, w) at the training size: what the model sees."""
    if tuple(image.shape[-1:-3:-1]) != tuple(image_size):
        image = resize_image(image, image_size)
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), mean, std)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised float (3, H, W) -> uint8 (H, W, 3), the inverse of to_model_input's normalisation."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


class SegmentationDataset(torch.utils.data.Dataset):
    """One split of a dataset on disk. ds[i] -> (image float32 (3,H,W) normalised at image_size, mask int64
    (H,W) of class indices with IGNORE_INDEX for void); a split without labels gives the image only. With
    augment, items are random crops of crop_size (default: image_size) from the randomly scaled image, after
    copy-paste: with probability paste_prob the pixels of paste_classes in a random photo of the split (possibly
    the item's own, mirrored half the time) replace the item's own, where they lie.

    layout: "auto" (recognised from the folder), "cityscapes", "camvid", "folder", or a layout object.
    classes: None (the layout's default classes), a list of names, or a ClassTable. Files whose size differs
    from image_size are resized on the fly (`python dataset.py prepare` once avoids it). With
    label_resolution=True masks keep the size of their files (evaluation at the labels' own resolution).
    """

    def __init__(self, root, split="train", image_size=DEFAULT_IMAGE_SIZE, classes=None, augment=False, layout="auto",
                 use_train_id_files=False, scale_range=(0.5, 2.0), hflip_prob=0.5, color_jitter=0.2,
                 label_resolution=False, mean=MEAN, std=STD, crop_size=None, paste_prob=0.0, paste_classes=()):
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.layout = layout if not isinstance(layout, str) else open_layout(root, layout, use_train_id_files)
        self.root, self.split, self.label_resolution = Path(root), split, label_resolution
        self.image_size, self.crop_size = tuple(image_size), tuple(crop_size or image_size)
        for name, size in (("image_size", self.image_size), ("crop_size", self.crop_size)):
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"{name} must be (width, height) of positive ints, got {size}")
        self.class_table = classes if isinstance(classes, ClassTable) else self.layout.class_table(classes)
        self.samples = self.layout.samples(split)
        self.has_labels = all(mask is not None for _, mask in self.samples)
        if augment and not self.has_labels:
            raise DatasetError(f"split {split!r} has no labels, so it cannot be augmented (use it for inference only)")
        check_augmentation(paste_prob=paste_prob)
        self.paste_prob = paste_prob if augment and paste_classes else 0.0
        self.paste_classes = torch.tensor(paste_classes, dtype=torch.uint8)
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = build_transform(self.image_size, augment, scale_range, hflip_prob, color_jitter, mean, std,
                                         self.crop_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, mask = self.read_sample(index)
        if mask is None:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        if self.label_resolution:
            return to_model_input(image, self.image_size, self.mean, self.std), mask.long()
        if self.paste_prob and torch.rand(()) < self.paste_prob:
            donor_index, mirrored = int(torch.randint(len(self), ())), bool(torch.rand(()) < 0.5)
            image, mask = paste(image, mask, *self.read_sample(donor_index), self.paste_classes, mirrored)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def read_sample(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image uint8 (3,H,W), class ids uint8 (H,W) or None) before the transform: at image_size, or with
        label_resolution the photo and mask as they are on disk."""
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        size_on_disk = (image.shape[2], image.shape[1])
        train_ids = None if mask_path is None else self.read_train_ids(mask_path, size_on_disk, image_path)
        if size_on_disk != self.image_size and not self.label_resolution:
            image = resize_image(image, self.image_size)
            train_ids = None if train_ids is None else resize_mask(train_ids, self.image_size)
        return image, train_ids

    def read_train_ids(self, mask_path, image_size_on_disk, image_path) -> torch.Tensor:
        """uint8 (H, W) class ids at the mask's own size, checked against the image and the valid values."""
        train_ids = self.class_ids(mask_path)
        mask_size = (train_ids.shape[1], train_ids.shape[0])
        if mask_size != image_size_on_disk:
            raise DatasetError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but image {image_path.name} "
                               f"is {image_size_on_disk[0]}x{image_size_on_disk[1]}")
        return torch.from_numpy(train_ids)

    def class_ids(self, mask_path) -> np.ndarray:
        """uint8 (H, W) class ids of a mask file, its values checked."""
        mask = self.layout.read_mask(mask_path)
        table = self.class_table
        if not table.valid[mask].all():
            bad = np.unique(mask[~table.valid[mask]])
            raise DatasetError(f"{mask_path}: invalid mask values {bad.tolist()[:10]}, expected {table.valid_description}")
        return table.label_to_train[mask]

    def class_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixels of each class, pixels of the images where the class appears), over the split's masks at
        their own size: the statistics of median-frequency balancing."""
        pixels, present = np.zeros((2, self.class_table.num_classes), dtype=np.int64)
        for _, mask_path in self.samples:
            counts = np.bincount(self.class_ids(mask_path).ravel(), minlength=256)[: self.class_table.num_classes]
            pixels += counts
            present += np.where(counts > 0, counts.sum(), 0)
        return pixels, present


# ----------------------------------------------------------------------------- prepare

class Indexed(torch.utils.data.Dataset):
    """dataset[i] -> (i, *dataset[i]), so that evaluation knows which sample each prediction belongs to."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (index, *self.dataset[index])


def collate_indexed(samples):
    """(indices, images stacked (all at the training size), masks as a list (each at its labels' own size))."""
    indices, images, masks = zip(*samples)
    return list(indices), torch.stack(images), list(masks)


def prepare_file(job, size: tuple[int, int]):
    """Downscale one file: photos antialiased bilinear, masks nearest (their palette, if any, kept)."""
    source, target, is_mask = job
    if is_mask:
        with Image.open(source) as mask:
            mask.load()
        resized = mask.resize(size, Image.NEAREST)
        write_image_atomically(target, resized)
    else:
        pixels = resize_image(read_image(source), size).permute(1, 2, 0).numpy()
        image_format = Image.registered_extensions().get(target.suffix.lower(), "PNG")
        options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(image_format, {})
        write_image_atomically(target, pixels, image_format, **options)


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


def prepare(src, dst, size=DEFAULT_IMAGE_SIZE, workers=None, layout="auto") -> tuple[int, int]:
    """Write a downscaled copy of the dataset at src into dst, in the same layout, over `workers` processes
    (default: all cores). Idempotent and resumable. Returns (files written, files skipped)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise DatasetError(f"{src}: source root not found")
    if dst == src or src in dst.parents:
        raise DatasetError(f"{dst}: destination must lie outside the source {src} (raw data is never modified)")
    source = open_layout(src, layout)
    jobs = [(path, dst / path.relative_to(src), is_mask) for path, is_mask in source.files_to_prepare()]
    if isinstance(source, FolderLayout):
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / FolderLayout.CLASSES_FILE, dst / FolderLayout.CLASSES_FILE)
    for folder in {target.parent for _, target, _ in jobs}:  # what a killed run left of its atomic writes
        remove_stale_temp_files(folder)
    pending = [job for job in jobs if not _is_prepared(job[1], size)]
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


def drive_of(path: Path) -> str:
    """CamVid's drive (video sequence) of a frame: the file name's prefix, e.g. 0006R0 for 0006R0_f02130.png."""
    return path.name.split("_", 1)[0]


def holdout(src, dst, val_drives) -> dict:
    """Copy CamVid at src to dst, same layout, with val = every labelled frame (train and val) of `val_drives` and
    train = every other one; test/ is copied as it is. Official val is more frames of a drive that train covers, so
    it rewards remembering a drive; a held-out drive predicts an unseen one. Returns {split: frames}."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    layout = open_layout(src, "camvid")
    if dst == src or src in dst.parents or dst.exists() and any(dst.iterdir()):
        raise DatasetError(f"{dst}: destination must be a new or empty folder outside {src}")
    pairs = [pair for split in ("train", "val") for pair in layout.samples(split)]
    drives = sorted({drive_of(image) for image, _ in pairs})
    unknown = sorted(set(val_drives) - set(drives))
    if unknown:
        raise DatasetError(f"{src}: no frames of drive {', '.join(unknown)} (its drives: {', '.join(drives)})")
    if set(val_drives) == set(drives):
        raise DatasetError(f"--val_drive: holding out every drive ({', '.join(drives)}) leaves nothing to train on")
    jobs = [("val" if drive_of(image) in val_drives else "train", image, mask) for image, mask in pairs]
    names = [(split, image.name) for split, image, _ in jobs]
    if len(set(names)) < len(names):
        split, name = next(name for name in names if names.count(name) > 1)
        raise DatasetError(f"{src}: {name} is in both train and val; their copies would share {dst / split / name}")
    if (src / "test").is_dir():
        jobs += [("test", image, mask) for image, mask in layout.samples("test")]
    for split, image, mask in tqdm(jobs, desc=f"holdout {' '.join(val_drives)}", unit="frame"):
        for source, folder in ((image, split), (mask, f"{split}annot")):
            if source is not None:
                (dst / folder).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dst / folder / source.name)
    return {split: sum(job[0] == split for job in jobs) for split in SPLITS}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Copies of a dataset: downscaled, so that loading never starves "
                                     "training (prepare), or with a drive held out as val (holdout, CamVid).")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write a downscaled copy of a dataset")
    prepare_parser.add_argument("--src", required=True, help="the dataset as distributed (Cityscapes, CamVid or "
                                "the folder layout)")
    prepare_parser.add_argument("--dst", required=True, help="output root, same layout")
    prepare_parser.add_argument("--size", type=size_arg, default=DEFAULT_IMAGE_SIZE,
                                help="WIDTHxHEIGHT (default: %(default)s)")
    prepare_parser.add_argument("--dataset", choices=["auto", *LAYOUTS], default="auto",
                                help="the layout of --src (default: auto, recognised from its folders)")
    prepare_parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    holdout_parser = commands.add_parser("holdout", help="copy CamVid with one whole drive as val, to measure "
                                         "what an unseen drive scores (CamVid's own val is more of a train drive)")
    holdout_parser.add_argument("--src", required=True, help="CamVid as the SegNet tutorial distributes it")
    holdout_parser.add_argument("--dst", required=True, help="a new folder for the copy, in the CamVid layout")
    holdout_parser.add_argument("--val_drive", nargs="+", default=["0006R0"],
                                help="drives (file-name prefixes) that make up val; train gets every other labelled "
                                     "frame of train and val (default: %(default)s)")
    args = parser.parse_args(argv)

    def run():
        if args.command == "holdout":
            counts = holdout(args.src, args.dst, args.val_drive)
            print(f"{args.dst}: " + ", ".join(f"{split} {count} frames" for split, count in counts.items() if count))
            return 0
        written, skipped = prepare(args.src, args.dst, args.size, args.workers, args.dataset)
        print(f"{args.dst}: wrote {written} files, skipped {skipped} already prepared")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
