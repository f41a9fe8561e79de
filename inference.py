"""Segment any folder of images with a trained U-Net, or score a checkpoint on a Cityscapes split.

    python inference.py                     # InferenceOutput/TestImages -> InferenceOutput/TestPredictions
    python inference.py --input "photos/*.jpg" --output out --label_ids
    python inference.py --evaluate --data_root Dataset/synthetic --split val --save_label_ids

For each input NAME.ext three files are written: NAME_mask.png (one channel: train ids, or
Cityscapes label ids with --label_ids, the official submission format), NAME_color.png (the class
palette) and NAME_overlay.jpg (the palette blended over the photo).

Decisions, and why:
- Aspect ratio: every photo is resized (squashed) to the training size, as the seed did, and the
  logits are upsampled back to the photo's own size, so the mask matches the photo pixel for
  pixel. Letterboxing would show the model padding it never saw in training (it labels it with
  some class), and shrinks the scene further. Cityscapes-like 2:1 street photos are not distorted.
- Masks are made at the ORIGINAL resolution: the logits (not the mask) are upsampled bilinearly,
  then argmax. For big photos the upsampling runs over chunks of classes with a running argmax,
  so a 4000x3000 photo never holds 19 full-size float maps (912 MB) at once.
- Orientation: EXIF rotation is applied first, so the mask matches the photo as displayed.
  16-bit images are scaled to 8 bits (x / 257), not clipped; transparency is composited over white.
- Output names: NAME is the file's stem; when several inputs share a stem (a.jpg and a.png) each
  of them keeps its extension (a.jpg_mask.png, a.png_mask.png), so nothing is overwritten.
- Inputs are never touched: the output folder may not be a folder an input lives in (predictions
  would mix with the photos and be read back as inputs on the next run), outputs are derived from
  base names only (they cannot leave the output folder) and are written to a temporary file that
  is then renamed (a symlink in the output folder is replaced, never written through).
- Bad files (corrupt, truncated, empty, not an image) get one warning line each; the rest are
  still written, and the exit status is 1 if any input was skipped (2 for usage errors). In folder
  mode, files without an image extension (notes.txt, readme.md) are not inputs: they are listed in
  the final summary line instead, so a photo saved with an odd extension is not missed silently.
- Speed: DataLoader workers decode and resize, the main process runs batches of same-sized
  inputs under inference_mode (channels_last with BatchNorm folded into the convs; bf16 autocast on
  CUDA), and a thread pool encodes the PNG/JPEG outputs while the next batch runs.
- Evaluation scores at the full label resolution (logits upsampled to each label map), the official
  protocol. --save_label_ids writes OUTPUT/label_ids/{city}_{seq}_{frame}_leftImg8bit.png: the
  official script finds a prediction by the pattern {city}_{seq}_{frame}*.png under one folder, so
  the folder holds nothing else (NAME_color.png files would match too).
- Checkpoints load with torch.load(weights_only=True): a file whose unpickling would run code is
  refused before anything from it runs. A bare state_dict also loads: the U-Net whose parameter
  shapes match it exactly is rebuilt (flags can pin any size the shapes cannot tell).
"""
import argparse
import glob
import json
import os
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dataset import (MEAN, STD, CityscapesDataset, ClassTable, colorize, one_line, overlay, read_mask, resize_image,
                     size_arg, write_image_atomically)
from metrics import ConfusionMatrix, finite_or_none, format_table, plot_confusion_matrix
from training import load_checkpoint_file, resolve_amp_dtype, resolve_device
from unet import UNet

DEFAULT_CHECKPOINT = "unet_model.pth"
DEFAULT_INPUT = "InferenceOutput/TestImages"
DEFAULT_OUTPUT = "InferenceOutput/TestPredictions"
DEFAULT_EVAL_OUTPUT = "InferenceOutput/Evaluation"
# The seed trained at 512x256; used when a bare state_dict carries no image size.
FALLBACK_IMAGE_SIZE = (512, 256)
# Photo formats only: Image.open() is limited to these, so a mislabelled file never reaches an
# exotic decoder (Pillow's EPS plugin, for one, runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
IMAGE_SUFFIXES = {ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS}
# Upper bound on the float32 logits upsampled at once (see upsample_argmax).
UPSAMPLE_BYTES = 256 * 2**20

Checkpoint = namedtuple("Checkpoint", "model class_table image_size mean std")
Decoded = namedtuple("Decoded", "index model_input photo error")


# ----------------------------------------------------------------------------- checkpoint

def read_checkpoint(path):
    """training.load_checkpoint_file, with a hint when there is no checkpoint yet."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: train a model first with "
                                f"`python training.py` (or pass --checkpoint PATH)")
    return load_checkpoint_file(path)


def infer_unet_config(state_dict, fixed):
    """The UNet config whose parameter shapes equal the state_dict's.

    in_channels/base_channels come from the first conv, num_classes from the head (the last conv);
    depth and bilinear are found by building each candidate on the meta device (no memory, no init
    cost) and comparing every key and shape, so nothing depends on unet.py's attribute names.
    `fixed` holds the sizes given on the command line (None = infer).
    """
    conv_weights = [tensor for tensor in state_dict.values() if tensor.ndim == 4]
    if not conv_weights:
        raise ValueError("no conv weights in the state_dict: not a U-Net")
    base_channels = fixed["base_channels"] or conv_weights[0].shape[0]
    num_classes = fixed["num_classes"] or conv_weights[-1].shape[0]
    in_channels = conv_weights[0].shape[1]
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    for depth in [fixed["depth"]] if fixed["depth"] else range(1, 9):
        for bilinear in [fixed["bilinear"]] if fixed["bilinear"] is not None else [False, True]:
            with torch.device("meta"):
                candidate = UNet(in_channels, num_classes, base_channels, depth, bilinear=bilinear)
            if {key: tuple(tensor.shape) for key, tensor in candidate.state_dict().items()} == shapes:
                return candidate.config
    raise ValueError("its shapes match no U-Net; pass --num_classes, --base_channels, --depth and --bilinear")


def load_checkpoint(path, fixed_sizes=None, class_names=None):
    """Rebuild the model, class table, input size and normalisation a checkpoint was trained with.

    Accepts the training.py dict ({"model", "model_config", "class_names", "image_size", "mean",
    "std"}) or a bare state_dict (optionally saved from a torch.compile'd or DDP model). Bare
    state_dicts know no class names (`class_names`, else the 19 official Cityscapes classes), no
    input size (the seed's 512x256 unless --image_size) and no statistics (MEAN/STD).
    """
    contents = read_checkpoint(path)
    if not isinstance(contents, dict) or not contents:
        raise ValueError(f"checkpoint {path} holds a {type(contents).__name__}, not a model")
    fixed_sizes = fixed_sizes or dict(num_classes=None, base_channels=None, depth=None, bilinear=None)
    if "model" in contents and "model_config" in contents:
        state_dict, config = contents["model"], contents["model_config"]
        class_names = contents.get("class_names")
        image_size = contents.get("image_size", FALLBACK_IMAGE_SIZE)
        mean, std = contents.get("mean", MEAN), contents.get("std", STD)
    elif all(isinstance(value, torch.Tensor) for value in contents.values()):
        state_dict = dict(contents)
        for prefix in ("_orig_mod.", "module."):
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, prefix)
        try:
            config = infer_unet_config(state_dict, fixed_sizes)
        except ValueError as exc:
            raise ValueError(f"bare state_dict {path}: {exc}") from None
        image_size = FALLBACK_IMAGE_SIZE
        mean, std = MEAN, STD
    else:
        raise ValueError(f"checkpoint {path} is neither a training.py checkpoint nor a state_dict "
                         f"(keys: {', '.join(map(str, list(contents)[:6]))})")
    num_classes = config["num_classes"]
    if class_names is None and num_classes != len(ClassTable.from_names().names):
        raise ValueError(f"checkpoint {path} has {num_classes} classes but no class names: pass --classes")
    class_table = ClassTable.from_names(class_names)
    if class_table.num_classes != num_classes:
        raise ValueError(f"checkpoint {path}: {class_table.num_classes} class names for a "
                         f"{num_classes}-class model")
    model = UNet(**config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"checkpoint {path}: weights do not fit its model_config ({detail[:300]})") from None
    return Checkpoint(model.eval(), class_table, tuple(image_size), tuple(mean), tuple(std))


# ----------------------------------------------------------------------------- images in

def load_photo(path):
    """Any supported image file -> uint8 RGB (H, W, 3), as displayed (EXIF orientation applied)."""
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grayscale (I;16*) or 32-bit I: scale, don't clip
        gray = np.asarray(image).astype(np.float32) / 257
        image = Image.fromarray(gray.round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def to_model_input(photo, image_size, mean, std):
    """uint8 (3, H, W) tensor -> normalised float (3, h, w) at the training size (W, H), resized
    exactly as the dataset resizes training images."""
    return TF.normalize(TF.to_dtype(resize_image(photo, image_size), torch.float32, scale=True), mean, std)


def describe_failure(path, exc):
    if path.is_file() and path.stat().st_size == 0:
        return "empty file"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image, or not a supported format (JPEG, PNG, BMP, WebP, TIFF, GIF, PPM)"
    return f"{type(exc).__name__}: {exc}"


class ImageFiles(Dataset):
    """Decodes and resizes one file per item inside DataLoader workers; a file that fails comes
    back as an error string instead of raising, so one bad file never stops the run."""

    def __init__(self, paths, image_size, mean, std):
        self.paths, self.image_size, self.mean, self.std = paths, image_size, mean, std

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            photo = torch.from_numpy(load_photo(path).copy())
        # Pillow reports malformed files through many exception types (OSError, SyntaxError,
        # ValueError, struct.error, DecompressionBombError, ...): all mean "skip this file".
        except Exception as exc:
            return Decoded(index, None, None, describe_failure(path, exc))
        model_input = to_model_input(photo.permute(2, 0, 1), self.image_size, self.mean, self.std)
        return Decoded(index, model_input, photo, None)


def collate_decoded(samples):
    """Stack the inputs that decoded (all at the training size); keep photos (any size) and
    failures as lists."""
    decoded = [sample for sample in samples if sample.error is None]
    return {
        "indices": [sample.index for sample in decoded],
        "inputs": torch.stack([sample.model_input for sample in decoded]) if decoded else None,
        "photos": [sample.photo for sample in decoded],
        "failures": [(sample.index, sample.error) for sample in samples if sample.error is not None],
    }


def find_images(spec):
    """(inputs, other files): a folder gives its image files by extension (not recursive, hidden
    files skipped) and, as other files, the rest, to be reported; one file (any name) or a glob
    (every file it matches) gives no other files."""
    path = Path(spec)
    if path.is_dir():
        files = [file for file in path.iterdir() if file.is_file() and not file.name.startswith(".")]
        paths = [file for file in files if file.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise FileNotFoundError(f"no images in {path} (supported: {', '.join(sorted(IMAGE_SUFFIXES))})")
        return sorted(paths), sorted(file for file in files if file.suffix.lower() not in IMAGE_SUFFIXES)
    if path.is_file():
        return [path], []
    if any(char in spec for char in "*?["):
        paths = [Path(match) for match in glob.glob(spec, recursive=True) if Path(match).is_file()]
        if not paths:
            raise FileNotFoundError(f"no files match {spec}")
        return sorted(paths), []
    raise FileNotFoundError(f"input {spec} does not exist")


# ----------------------------------------------------------------------------- outputs

def output_names(paths):
    """Base output name per input: the stem, or the full file name where stems collide (compared
    case-insensitively, as on macOS/Windows file systems); a numbered suffix settles what is left
    (same file name in two globbed folders)."""
    stem_counts = {}
    for path in paths:
        stem_counts[path.stem.casefold()] = stem_counts.get(path.stem.casefold(), 0) + 1
    names, taken = [], set()
    for path in paths:
        name = path.stem if stem_counts[path.stem.casefold()] == 1 else path.name
        unique, number = name, 2
        while unique.casefold() in taken:
            unique, number = f"{name}_{number}", number + 1
        taken.add(unique.casefold())
        names.append(unique)
    return names


def check_output_folder(paths, output_dir):
    """Refuse an output folder that holds any of the inputs (see the module docstring)."""
    resolved_output = output_dir.resolve()
    for path in paths:
        if path.resolve().parent == resolved_output:
            raise ValueError(f"output folder {output_dir} contains the input {path}: choose another "
                             f"--output so your images are never mixed with or overwritten by predictions")


def make_output_folder(output_dir):
    """mkdir -p, with a clear message for the likely mistake of naming an existing file."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} is an existing file, not a folder: choose another --output")
    output_dir.mkdir(parents=True, exist_ok=True)


def summary_line(num_written, num_skipped, not_images, output_dir):
    """The run's last line, e.g. `3 written, 1 skipped, 2 not images (notes.txt, readme.md) -> out`:
    the note a folder's non-image files get (at most five names, so it stays one line)."""
    line = f"{num_written} written, {num_skipped} skipped"
    if not_images:
        names = ", ".join(path.name for path in not_images[:5]) + (", ..." if len(not_images) > 5 else "")
        line += f", {len(not_images)} {'not an image' if len(not_images) == 1 else 'not images'} ({names})"
    return f"{line} -> {output_dir}"


def write_prediction(photo, mask, output_dir, name, class_table, mask_values, alpha):
    """NAME_mask.png (train ids mapped through mask_values), NAME_color.png, NAME_overlay.jpg."""
    write_image_atomically(output_dir / f"{name}_mask.png", mask_values[mask])
    write_image_atomically(output_dir / f"{name}_color.png", colorize(mask, class_table.colors))
    write_image_atomically(output_dir / f"{name}_overlay.jpg", overlay(photo, mask, class_table.colors, alpha),
                           "JPEG", quality=90)


def train_to_label_ids(class_table):
    """(256,) uint8 look-up table: train id -> Cityscapes label id (the official submission format)."""
    table = np.zeros(256, dtype=np.uint8)
    table[: class_table.num_classes] = class_table.label_ids
    return table


# ----------------------------------------------------------------------------- model

def use_channels_last(choice):
    """auto: on. NHWC is oneDNN's fastest layout for inference on CPUs (1.21-1.29x over NCHW for the
    classic U-Net at 512x256, bench/README.md) and, by cuDNN's design, for tensor-core convs on GPUs
    (not yet measured here); training on AVX2 CPUs is the exception, which is why training.py decides
    on its own (training.resolve_channels_last)."""
    return choice != "off"


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm into the conv before it (in place): the same function with
    one pass over the feature map fewer per conv: 1.03-1.08x faster CPU inference (bench/README.md)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            for index in range(len(module) - 1):
                conv, norm = module[index], module[index + 1]
                if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                    module[index] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
                    module[index + 1] = torch.nn.Identity()
    return model


def prepare_model(model, device, channels_last, fold_bn=True):
    """The model as inference runs it; fold_bn=False keeps the trained graph (bench/layout.py times both)."""
    model = model.eval().to(device)
    if fold_bn:
        model = fold_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same input size
    return model


def run_model(model, inputs, device, amp_dtype, channels_last):
    inputs = inputs.to(device, non_blocking=True)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(inputs)


def upsample_argmax(logits, size):
    """(C, h, w) logits -> (H, W) int64 class map: bilinear upsampling of the logits to `size`, then
    argmax. Classes are upsampled in chunks of at most UPSAMPLE_BYTES with a running max, which
    gives exactly the full argmax (ties keep the lowest class, like torch.argmax). The logits are made
    contiguous first: a channels_last model's output would make both steps ~3x slower."""
    height, width = size
    logits = logits.float().contiguous()
    chunk = max(1, UPSAMPLE_BYTES // (4 * height * width))
    best_score = best_class = None
    for start in range(0, logits.shape[0], chunk):
        scores = F.interpolate(logits[None, start:start + chunk], size=size, mode="bilinear", align_corners=False)[0]
        score, label = scores.max(0)
        label += start
        if best_score is None:
            best_score, best_class = score, label
        else:
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_class = torch.where(better, label, best_class)
    return best_class


# ----------------------------------------------------------------------------- predict

@torch.inference_mode()
def predict(args, checkpoint):
    """Segment every input; returns the exit status (0, or 1 when some input was skipped)."""
    device = resolve_device(args.device, local_rank=0)
    amp_dtype = resolve_amp_dtype(args.amp, device)
    paths, not_images = find_images(args.input)
    output_dir = Path(args.output)
    check_output_folder(paths, output_dir)
    make_output_folder(output_dir)
    names = output_names(paths)
    image_size = args.image_size or checkpoint.image_size
    class_table = checkpoint.class_table
    mask_values = train_to_label_ids(class_table) if args.label_ids else np.arange(256, dtype=np.uint8)
    channels_last = use_channels_last(args.channels_last)
    model = prepare_model(checkpoint.model, device, channels_last)
    loader = DataLoader(ImageFiles(paths, image_size, checkpoint.mean, checkpoint.std),
                        batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_decoded,
                        pin_memory=device.type == "cuda")

    skipped, pending = [], []

    def skip(index, reason):
        skipped.append(paths[index])
        tqdm.write(f"warning: skipped {paths[index]}: {reason}", file=sys.stderr)

    def finish(job):
        index, future = job
        try:
            future.result()
        except OSError as exc:
            skip(index, f"could not write its outputs ({exc})")

    # disable=None: no bar when stderr is not a terminal, so a log holds the warnings as plain lines
    progress = tqdm(total=len(paths), unit="img", desc="segmenting", dynamic_ncols=True, disable=None)
    with ThreadPoolExecutor(max_workers=args.writer_threads) as writer:
        for batch in loader:
            for index, reason in batch["failures"]:
                skip(index, reason)
            if batch["inputs"] is not None:
                logits = run_model(model, batch["inputs"], device, amp_dtype, channels_last)
                for index, photo, image_logits in zip(batch["indices"], batch["photos"], logits):
                    mask = upsample_argmax(image_logits, photo.shape[:2]).byte().cpu().numpy()
                    pending.append((index, writer.submit(write_prediction, photo.numpy(), mask, output_dir,
                                                         names[index], class_table, mask_values, args.alpha)))
            while len(pending) > 2 * args.batch_size:  # bound the photos and masks held in memory
                finish(pending.pop(0))
            progress.update(len(batch["indices"]) + len(batch["failures"]))
        for job in pending:
            finish(job)
    progress.close()
    print(summary_line(len(paths) - len(skipped), len(skipped), not_images, output_dir))
    return 1 if skipped else 0


# ----------------------------------------------------------------------------- evaluate

class FullResolutionTargets(Dataset):
    """The dataset's model input (resized to the training size) with the label map at its full,
    original resolution, where the official protocol scores."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, _ = self.dataset[index]
        label_ids = read_mask(self.dataset.samples[index][1]).numpy()
        return index, image, torch.from_numpy(self.dataset.class_table.label_to_train[label_ids].astype(np.int64))


def collate_full_resolution(samples):
    indices, images, targets = zip(*samples)
    return indices, torch.stack(images), targets


def report_dict(results, matrix, class_names, args, num_images):
    """JSON-ready summary; undefined scores (NaN) become null."""
    return {
        "checkpoint": str(args.checkpoint),
        "data_root": str(args.data_root),
        "split": args.split,
        "num_images": num_images,
        **{key: finite_or_none(results[key]) for key in ("miou", "fwiou", "pixel_acc", "mean_acc")},
        "per_class": {name: {"iou": finite_or_none(iou), "dice": finite_or_none(dice)}
                      for name, iou, dice in zip(class_names, results["iou"].tolist(), results["dice"].tolist())},
        "confusion_matrix": matrix.tolist(),
    }


@torch.inference_mode()
def evaluate(args, checkpoint):
    """Predict every image of a labelled split and score at full label resolution; writes
    evaluation_{split}.json and confusion_matrix_{split}.png, and with --save_label_ids one
    label-id PNG per image in label_ids/, named like the image so cityscapesscripts finds it."""
    class_table = checkpoint.class_table
    dataset = CityscapesDataset(args.data_root, split=args.split, image_size=args.image_size or checkpoint.image_size,
                                classes=class_table.names)
    if not dataset.has_labels:
        raise ValueError(f"split {args.split} of {args.data_root} has no labels to evaluate against")
    output_dir = Path(args.output)
    label_id_dir = output_dir / "label_ids"
    make_output_folder(output_dir)
    label_lut = torch.from_numpy(train_to_label_ids(class_table))
    device = resolve_device(args.device, local_rank=0)
    amp_dtype = resolve_amp_dtype(args.amp, device)
    channels_last = use_channels_last(args.channels_last)
    model = prepare_model(checkpoint.model, device, channels_last)
    loader = DataLoader(FullResolutionTargets(dataset), batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_full_resolution, pin_memory=device.type == "cuda")
    confusion = ConfusionMatrix(class_table.num_classes, device=device)
    batches = tqdm(loader, desc=f"evaluating {args.split}", unit="batch", dynamic_ncols=True, disable=None)
    for indices, images, targets in batches:
        logits = run_model(model, images, device, amp_dtype, channels_last)
        for index, image_logits, target in zip(indices, logits, targets):
            pred = upsample_argmax(image_logits, target.shape)
            confusion.update(pred[None], target.to(device, non_blocking=True)[None])
            if args.save_label_ids:
                image_name = dataset.samples[index][0].name
                write_image_atomically(label_id_dir / image_name, label_lut[pred.cpu()].numpy())
    results = confusion.compute()
    print(format_table(results, class_table.names))
    report = report_dict(results, confusion.matrix, class_table.names, args, len(dataset))
    report_path = output_dir / f"evaluation_{args.split}.json"
    report_path.write_text(json.dumps(report, indent=2))
    plot_confusion_matrix(confusion.matrix, class_table.names, output_dir / f"confusion_matrix_{args.split}.png")
    print(f"report -> {report_path}")
    return 0


# ----------------------------------------------------------------------------- CLI

def build_parser():
    """Every flag's help ends with its default, or with what happens when the flag is not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="training.py checkpoint or a bare state_dict (default: %(default)s)")
    parser.add_argument("--input", default=DEFAULT_INPUT,
                        help="a folder, one image file, or a glob in quotes (default: %(default)s)")
    parser.add_argument("--output", help=f"output folder, created if missing (default: {DEFAULT_OUTPUT}; "
                                          f"{DEFAULT_EVAL_OUTPUT} with --evaluate)")
    parser.add_argument("--image_size", type=size_arg,
                        help="model input WxH (default: the training size the checkpoint records)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="autocast dtype; auto: bf16/fp16 on CUDA, off on CPU (default: %(default)s)")
    parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                        help="NHWC memory format; auto: on (measured fastest for CPU inference; cuDNN's "
                             "preferred layout on GPUs) (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader processes that decode and resize (default: %(default)s)")
    parser.add_argument("--writer_threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads that encode and write the output images (default: %(default)s)")
    parser.add_argument("--label_ids", action="store_true",
                        help="masks hold Cityscapes label ids (official format) instead of train ids (default: "
                             "train ids)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the palette in the overlay (default: %(default)s)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--evaluate", action="store_true",
                            help="score the checkpoint on --data_root/--split (default: segment --input)")
    evaluation.add_argument("--data_root", help="Cityscapes-layout root with leftImg8bit/ and gtFine/ "
                                                "(required with --evaluate)")
    evaluation.add_argument("--split", default="val", help="a labelled split: val or train (default: %(default)s)")
    evaluation.add_argument("--save_label_ids", action="store_true",
                            help="also write full-resolution label-id PNGs for cityscapesscripts to "
                                 "OUTPUT/label_ids (default: off)")
    bare = parser.add_argument_group("bare state_dict checkpoints (only needed where the shapes cannot tell)")
    bare.add_argument("--num_classes", type=int,
                      help="classes the head predicts (default: read from the head's weights)")
    bare.add_argument("--base_channels", type=int,
                      help="channels of the first conv (default: read from its weights)")
    bare.add_argument("--depth", type=int, help="down-sampling steps (default: the one whose shapes match)")
    bare.add_argument("--bilinear", action=argparse.BooleanOptionalAction,
                      help="bilinear upsampling instead of transposed convs (default: the one whose shapes match)")
    bare.add_argument("--classes", nargs="+", help="Cityscapes class names in train-id order, as given to "
                      "training.py; quote names with spaces (default: the 19 evaluation classes)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or args.writer_threads < 1:
        parser.error("--batch_size and --writer_threads must be >= 1, --num_workers >= 0")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.evaluate and not args.data_root:
        parser.error("--evaluate needs --data_root")
    args.output = args.output or (DEFAULT_EVAL_OUTPUT if args.evaluate else DEFAULT_OUTPUT)
    return args


def main(argv=None):
    args = parse_args(argv)
    fixed_sizes = dict(num_classes=args.num_classes, base_channels=args.base_channels, depth=args.depth,
                       bilinear=args.bilinear)
    try:
        checkpoint = load_checkpoint(args.checkpoint, fixed_sizes, args.classes)
        return evaluate(args, checkpoint) if args.evaluate else predict(args, checkpoint)
    except (OSError, ValueError) as exc:  # OSError: an --output that cannot be created or written
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
