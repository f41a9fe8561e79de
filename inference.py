"""Segment any folder of images or videos with a trained U-Net, score a checkpoint on a labelled split, or use
it from Python.

    python inference.py                     # InferenceOutput/TestImages -> InferenceOutput/TestPredictions
    python inference.py --input "photos/*.jpg" --output out --label_ids
    python inference.py --input drive.mp4 --frames         # needs pip install -r requirements-video.txt
    python inference.py --evaluate --data_root ../shared/camvid --split val
    python inference.py --export unet_model.onnx           # needs pip install -r requirements-export.txt
    python inference.py --export unet_int8.onnx --int8 --data_root ../shared/camvid   # int8, calibrated
    python inference.py --checkpoint unet_int8.onnx        # any run, through ONNX Runtime (requirements-onnxruntime.txt)

    from inference import Segmenter
    segmenter = Segmenter("unet_model.pth")
    mask = segmenter("street.jpg")          # (H, W) uint8 class indices at the photo's own size

Every photo is resized to the --image_size the model was trained at (as the original project did) and the logits are
upsampled back, so the mask matches the photo pixel for pixel. For each input NAME.ext the CLI writes
NAME_mask.png (class indices, or Cityscapes label ids with --label_ids), NAME_color.png and
NAME_overlay.jpg (and with --save_confidence NAME_confidence.png); a video NAME.mp4 gives NAME_overlay.mp4
(video.py). Inputs are never modified; outputs are written atomically, so --skip_existing resumes a killed run.
--evaluate scores exactly these masks, at the labels' own resolution.
"""
import argparse
import contextlib
import dataclasses
import glob
import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import (CITYSCAPES_EVAL_NAMES, CITYSCAPES_NAMES, IGNORE_INDEX, IMAGE_SUFFIXES, MEAN, STD, ClassTable, DatasetError,
                     Indexed, SegmentationDataset, collate_indexed, default_palette, open_layout, photo_to_rgb,
                     read_photo, to_model_input)
from metrics import finite_or_none, format_table, score_split, scores
from onnx_runtime import EXPORT_REQUIREMENTS, OnnxPredictor, export_onnx
from runtime import (DEFAULT_IMAGE_SIZE, UserError, atomic_write, one_line, remove_stale_temp_files,
                     resolve_device, run_cli, size_arg, write_image_atomically)
from unet import (INPUT_NORMS, TTA_SCALES, WEIGHTS_FILE, Predictor, load_weights, mask_and_confidence, upsample_argmax,
                  upsample_confidence)
import video
from visualize import colorize, overlay, plot_confusion_matrix

DEFAULT_INPUT = "InferenceOutput/TestImages"
DEFAULT_OUTPUT = "InferenceOutput/TestPredictions"
DEFAULT_EVAL_OUTPUT = "InferenceOutput/Evaluation"


# ----------------------------------------------------------------------------- the model

def inference_classes(names, colors, dataset) -> ClassTable:
    """The class table of a checkpoint's names and colours. Cityscapes models also know their classes' label
    ids (for --label_ids); files that predate recorded colours get Cityscapes' own or the default palette."""
    if dataset in (None, "cityscapes", "synthetic") and set(names) <= set(CITYSCAPES_NAMES):
        table = ClassTable.from_names(names)
        return table if colors is None else dataclasses.replace(table, colors=np.array(colors, dtype=np.uint8))
    identity = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    identity[: len(names)] = np.arange(len(names))
    colors = default_palette(len(names)) if colors is None else colors
    return ClassTable(list(names), np.array(colors, dtype=np.uint8), identity, identity != IGNORE_INDEX, "class ids")


class Segmenter(Predictor):
    """A trained model, loaded once, that segments images as inference.py does.

    segmenter(image) takes a path, a PIL image or a numpy array ((H, W) gray or (H, W, 3) RGB uint8) and
    returns the (H, W) uint8 mask of class indices at the image's own size; with probabilities=True also
    the (C, H, W) float32 class probabilities, with confidence=True also the (H, W) float32 probability of the
    top class (what --save_confidence writes, times 255). class_names and class_table say what the indices mean.
    amp: auto is float32 on CPUs and bf16 on GPUs (runtime.autocast_dtype); tta: test-time augmentation,
    "none", "flip" or "ms" (see scores()).
    """

    def __new__(cls, checkpoint=WEIGHTS_FILE, *args, **kwargs):
        """An .onnx checkpoint makes an OnnxSegmenter: the same segmenter, its model run by ONNX Runtime."""
        if cls is Segmenter and is_onnx(checkpoint):
            cls = OnnxSegmenter
        return super().__new__(cls)

    def __init__(self, checkpoint=WEIGHTS_FILE, device="auto", amp="auto", channels_last="auto", image_size=None,
                 classes=None, tta="none", **bare_sizes):
        loaded = load_weights(checkpoint, bare_sizes, classes, DEFAULT_IMAGE_SIZE, MEAN, STD)
        super().__init__(loaded.model, resolve_device(device), amp, channels_last, tta)
        self.describe(image_size or loaded.image_size, loaded.mean, loaded.std, loaded.dataset, loaded.class_names,
                      loaded.class_colors)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same input size

    def describe(self, image_size, mean, std, dataset, class_names, class_colors):
        """What the model's inputs and outputs mean: its input size and normalisation, its classes."""
        self.image_size, self.mean, self.std, self.dataset = tuple(image_size), tuple(mean), tuple(std), dataset
        self.class_names = list(class_names)
        self.class_table = inference_classes(self.class_names, class_colors, dataset)

    def model_input(self, photo: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) photo -> normalised float (3, h, w) at the training size."""
        return to_model_input(torch.from_numpy(np.array(photo)).permute(2, 0, 1), self.image_size,
                              self.mean, self.std)

    @torch.inference_mode()
    def __call__(self, image, probabilities=False, confidence=False):
        photo = read_photo(image) if isinstance(image, (str, os.PathLike)) else photo_to_rgb(image)
        scores = self.scores(self.model_input(photo)[None])[0]
        mask = upsample_argmax(scores, photo.shape[:2]).byte().cpu().numpy()
        extra = []
        if probabilities:
            upsampled = F.interpolate(scores[None], size=photo.shape[:2], mode="bilinear", align_corners=False)[0]
            extra.append((upsampled.softmax(0) if self.tta == "none" else upsampled).cpu().numpy())
        if confidence:
            extra.append(upsample_confidence(scores, photo.shape[:2], self.tta != "none").cpu().numpy())
        return (mask, *extra) if extra else mask


def is_onnx(checkpoint) -> bool:
    return str(checkpoint).lower().endswith(".onnx")


class OnnxSegmenter(OnnxPredictor, Segmenter):
    """Segmenter(MODEL.onnx): an ONNX file of this project run by ONNX Runtime on the CPU, with inference.py's
    pre- and post-processing; its classes, size and normalisation come from the file's metadata."""

    def __init__(self, checkpoint, device="auto", amp="auto", channels_last="auto", image_size=None, classes=None,
                 tta="none", threads=None, **bare_sizes):
        OnnxPredictor.__init__(self, checkpoint, device, amp, tta, threads)
        meta = self.metadata
        self.describe(image_size or meta["image_size"], meta["mean"], meta["std"], meta.get("dataset"),
                      meta["class_names"], meta["class_colors"])


# ----------------------------------------------------------------------------- images in

class Decoded(NamedTuple):
    index: int
    model_input: torch.Tensor | None
    photo: torch.Tensor | None
    error: str | None


def describe_failure(path, error):
    if path.is_file() and path.stat().st_size == 0:
        return "empty file"
    if "not an image file" in str(error):
        return "not an image, or not a supported format (JPEG, PNG, BMP, WebP, TIFF, GIF, PPM)"
    return str(error).split(": ", 1)[-1]


class ImageFiles(Dataset):
    """Decodes and resizes one file per item inside DataLoader workers; a file that fails comes back as an
    error string instead of raising, so one bad file never stops the run."""

    def __init__(self, paths, image_size, mean, std):
        self.paths, self.image_size, self.mean, self.std = paths, image_size, mean, std

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            photo = read_photo(self.paths[index])
        except DatasetError as error:
            return Decoded(index, None, None, describe_failure(self.paths[index], error))
        photo = torch.from_numpy(photo.copy())
        return Decoded(index, to_model_input(photo.permute(2, 0, 1), self.image_size, self.mean, self.std), photo, None)


def collate_decoded(samples):
    """Stack the inputs that decoded (all at the training size); keep photos (any size) and failures as lists."""
    decoded = [sample for sample in samples if sample.error is None]
    return {"indices": [sample.index for sample in decoded],
            "inputs": torch.stack([sample.model_input for sample in decoded]) if decoded else None,
            "photos": [sample.photo for sample in decoded],
            "failures": [(sample.index, sample.error) for sample in samples if sample.error is not None]}


def find_images(spec):
    """(inputs, other files): a folder gives its image and video files by extension (not recursive, hidden
    files skipped) and, as other files, the rest, to be reported; one file or a glob gives no other files."""
    path = Path(spec)
    if path.is_dir():
        suffixes = IMAGE_SUFFIXES | video.VIDEO_SUFFIXES
        files = [file for file in path.iterdir() if file.is_file() and not file.name.startswith(".")]
        paths = [file for file in files if file.suffix.lower() in suffixes]
        if not paths:
            raise FileNotFoundError(2, f"no images or videos (supported: {', '.join(sorted(suffixes))})", str(path))
        return sorted(paths), sorted(file for file in files if file.suffix.lower() not in suffixes)
    if path.is_file():
        return [path], []
    if any(char in spec for char in "*?["):
        paths = [Path(match) for match in glob.glob(spec, recursive=True) if Path(match).is_file()]
        if not paths:
            raise UserError(f"no files match {spec}")
        return sorted(paths), []
    raise UserError(f"input {spec} does not exist")


# ----------------------------------------------------------------------------- outputs

def output_names(paths):
    """Base output name per input: the stem, or the full file name where stems collide (compared
    case-insensitively, as on macOS/Windows file systems); a numbered suffix settles what is left."""
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
    """Refuse an output folder that holds any of the inputs: predictions would mix with the photos and be
    read back as inputs on the next run."""
    resolved_output = output_dir.resolve()
    for path in paths:
        if path.resolve().parent == resolved_output:
            raise UserError(f"output folder {output_dir} contains the input {path}: choose another --output so your "
                            f"images are never mixed with or overwritten by predictions")


def make_output_folder(output_dir):
    """mkdir -p, with a clear message for the likely mistake of naming an existing file."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output {output_dir} is an existing file, not a folder: choose another --output")
    output_dir.mkdir(parents=True, exist_ok=True)


def summary_line(num_written, num_skipped, not_images, output_dir, num_done=0, num_incomplete=0):
    """The run's last line, e.g. `3 written, 1 skipped, 2 not images (notes.txt, readme.md) -> out`; also how
    many videos were damaged part way (written up to the damage) and, with --skip_existing, how many inputs
    already had their outputs."""
    line = f"{num_written} written" + (f" ({num_incomplete} incomplete)" if num_incomplete else "")
    line += f", {num_skipped} skipped" + (f", {num_done} already done" if num_done else "")
    if not_images:
        names = ", ".join(path.name for path in not_images[:5]) + (", ..." if len(not_images) > 5 else "")
        line += f", {len(not_images)} {'not an image' if len(not_images) == 1 else 'not images'} ({names})"
    return f"{line} -> {output_dir}"


def photo_outputs(output_dir, name, confidence):
    """The files written for a photo (NAME_confidence.png only with --save_confidence)."""
    kinds = ("mask.png", "color.png", "overlay.jpg") + (("confidence.png",) if confidence else ())
    return [output_dir / f"{name}_{kind}" for kind in kinds]


def write_prediction(photo, mask, output_dir, name, class_table, mask_values, alpha, confidence=None):
    """NAME_mask.png (class ids mapped through mask_values), NAME_color.png, NAME_overlay.jpg, and when given,
    NAME_confidence.png (8-bit gray, 255 = probability 1.0). The PNGs use zlib's fastest level: masks and
    palettes compress well even so, and encoding is part of what the user waits for."""
    if confidence is not None:
        write_image_atomically(output_dir / f"{name}_confidence.png", confidence, compress_level=1)
    write_image_atomically(output_dir / f"{name}_mask.png", mask_values[mask], compress_level=1)
    write_image_atomically(output_dir / f"{name}_color.png", colorize(mask, class_table.colors), compress_level=1)
    write_image_atomically(output_dir / f"{name}_overlay.jpg", overlay(photo, mask, class_table.colors, alpha),
                           "JPEG", quality=90)


def mask_values(class_table, label_ids, flag="--label_ids"):
    """(256,) uint8 look-up table from class index to the value written: the index itself, or with label_ids
    the Cityscapes label id (the official submission format)."""
    table = np.arange(256, dtype=np.uint8)
    if label_ids:
        if class_table.label_ids is None:
            raise UserError(f"{flag}: this model's classes are not Cityscapes classes; label ids exist for "
                            f"Cityscapes only")
        table[: class_table.num_classes] = class_table.label_ids
    return table


# ----------------------------------------------------------------------------- segment a folder

def predict(args, segmenter):
    """Segment every input, photos first, then videos; returns the exit status (0, or 1 when some input was
    skipped). With --skip_existing, inputs whose outputs all exist are left as they are."""
    paths, not_images = find_images(args.input)
    output_dir = Path(args.output)
    check_output_folder(paths, output_dir)
    values = mask_values(segmenter.class_table, args.label_ids)
    make_output_folder(output_dir)
    remove_stale_temp_files(output_dir)
    photos = [path for path in paths if not video.is_video(path)]
    videos = [path for path in paths if video.is_video(path)]
    # named apart: a photo's outputs and a video's never share a name, so a.png beside a.mp4 keeps both names "a"
    names = {**dict(zip(photos, output_names(photos))), **dict(zip(videos, output_names(videos)))}
    skipped, incomplete = [], []

    def skip(path, reason, kept_some=False):
        """One warning line per bad input; kept_some: a damaged video whose first frames were written."""
        (incomplete if kept_some else skipped).append(path)
        line = f"warning: {path}: {reason}" if kept_some else f"warning: skipped {path}: {reason}"
        tqdm.write(line, file=sys.stderr)

    done = 0
    if args.skip_existing:
        todo = [path for path in photos if not all(file.is_file() for file in
                                                  photo_outputs(output_dir, names[path], args.save_confidence))]
        photos, done = todo, len(photos) - len(todo)
    if photos:
        segment_photos(photos, names, args, segmenter, values, output_dir, skip)
    done += segment_videos(videos, names, args, segmenter, values, output_dir, skip)
    print(summary_line(len(paths) - len(skipped) - done, len(skipped), not_images, output_dir, done, len(incomplete)))
    return 1 if skipped or incomplete else 0


def segment_photos(paths, names, args, segmenter, values, output_dir, skip):
    """Decode in DataLoader workers, segment in batches, write in threads; skip(path, reason) for bad files."""
    files = ImageFiles(paths, segmenter.image_size, segmenter.mean, segmenter.std)
    loader = DataLoader(files, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_decoded,
                        pin_memory=segmenter.device.type == "cuda")
    pending = []

    def finish(job):
        index, future = job
        try:
            future.result()
        except OSError as error:
            skip(paths[index], f"could not write its outputs ({error})")

    # disable=None: no bar when stderr is not a terminal, so a log holds the warnings as plain lines
    progress = tqdm(total=len(paths), unit="img", desc="segmenting", dynamic_ncols=True, disable=None)
    probabilities = segmenter.tta != "none"
    with ThreadPoolExecutor(max_workers=args.writer_threads) as writer:
        for batch in loader:
            for index, reason in batch["failures"]:
                skip(paths[index], reason)
            if batch["inputs"] is not None:
                batch_scores = segmenter.scores(batch["inputs"])
                for index, photo, image_scores in zip(batch["indices"], batch["photos"], batch_scores):
                    mask, confidence = mask_and_confidence(image_scores, photo.shape[:2], probabilities,
                                                           args.save_confidence)
                    pending.append((index, writer.submit(write_prediction, photo.numpy(), mask, output_dir,
                                                         names[paths[index]], segmenter.class_table, values,
                                                         args.alpha, confidence)))
            while len(pending) > 2 * args.batch_size:  # bound the photos and masks held in memory
                finish(pending.pop(0))
            progress.update(len(batch["indices"]) + len(batch["failures"]))
        for job in pending:
            finish(job)
    progress.close()


def segment_videos(paths, names, args, segmenter, values, output_dir, skip):
    """Each video through video.segment_video, one at a time; returns how many were already done (--skip_existing).
    Without PyAV every video is skipped with one line saying what to install."""
    if not paths:
        return 0
    try:
        av = video.import_av()
    except UserError as error:
        for path in paths:
            skip(path, str(error))
        return 0
    done = 0
    for path in paths:
        if args.skip_existing and video.is_done(av, output_dir, names[path], args):
            video.overlay_path(output_dir, names[path], partial=True).unlink(missing_ok=True)  # Ctrl-C's, superseded
            done += 1
            continue
        try:
            video.segment_video(av, path, names[path], segmenter, args, output_dir, values)
        except video.VideoError as error:
            skip(path, str(error), kept_some=error.kept_some)
        except OSError as error:
            skip(path, f"could not write its outputs ({one_line(error)})")
    return done


# ----------------------------------------------------------------------------- score a labelled split

def evaluation_split(args, segmenter) -> SegmentationDataset:
    """The labelled split at --data_root, its masks at their own resolution, in the checkpoint's classes."""
    layout = open_layout(args.data_root, args.dataset)
    try:
        class_table = layout.class_table(segmenter.class_names)
    except DatasetError as error:
        raise UserError(f"{args.checkpoint}: its classes do not fit the {layout.kind} data at {args.data_root} "
                        f"({error})") from None
    dataset = SegmentationDataset(args.data_root, args.split, segmenter.image_size, class_table, layout=layout,
                                  label_resolution=True, mean=segmenter.mean, std=segmenter.std)
    if not dataset.has_labels:
        raise UserError(f"split {args.split} of {args.data_root} has no labels to evaluate against")
    return dataset


@torch.inference_mode()
def evaluate_split(args, segmenter):
    """Predict every image of a labelled split exactly as predict() does and score at the labels' own
    resolution; writes evaluation_SPLIT.json and confusion_matrix_SPLIT.png, and with --save_label_ids a
    label-id PNG per image in label_ids/, named like the image so cityscapesscripts finds it."""
    dataset = evaluation_split(args, segmenter)
    output_dir = Path(args.output)
    make_output_folder(output_dir)
    label_lut = torch.from_numpy(mask_values(segmenter.class_table, True, "--save_label_ids")) \
        if args.save_label_ids else None
    loader = DataLoader(Indexed(dataset), batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_indexed, pin_memory=segmenter.device.type == "cuda")

    def write_label_ids(indices, batch_scores, masks, predictions):
        for index, prediction in zip(indices, predictions):
            write_image_atomically(output_dir / "label_ids" / dataset.samples[index][0].name,
                                   label_lut[prediction.cpu()].numpy())

    batches = tqdm(loader, desc=f"evaluating {args.split}", unit="batch", disable=None)
    confusion = score_split(segmenter.scores, batches, dataset.class_table.num_classes, segmenter.device,
                            each_batch=write_label_ids if label_lut is not None else None)
    results = confusion.compute()
    names = dataset.class_table.names
    print(format_table(results, names))
    summary = scores(results, names)
    dice = [finite_or_none(value) for value in results["dice"].tolist()]
    report = {"checkpoint": str(args.checkpoint), "data_root": str(args.data_root), "dataset": dataset.layout.kind,
              "split": args.split, "tta": segmenter.tta, "num_images": len(dataset),
              **{key: summary[key] for key in ("miou", "fwiou", "pixel_acc", "mean_acc")},
              "per_class": {name: {"iou": iou, "dice": class_dice}
                            for (name, iou), class_dice in zip(summary["per_class_iou"].items(), dice)},
              "confusion_matrix": confusion.matrix.tolist()}
    report_path = output_dir / f"evaluation_{args.split}.json"
    atomic_write(report_path, lambda file: file.write(json.dumps(report, indent=2).encode()))
    plot_confusion_matrix(confusion.matrix, names, output_dir / f"confusion_matrix_{args.split}.png")
    print(f"report -> {report_path}")
    return 0


# ----------------------------------------------------------------------------- command line

def build_parser():
    """Every flag's help ends with its default, or with what happens when the flag is not given."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--checkpoint", default=WEIGHTS_FILE,
                        help="weights file of training.py (or its checkpoint.pt, or a bare state_dict), or an ONNX "
                             "model that --export wrote, run by ONNX Runtime (default: %(default)s)")
    parser.add_argument("--input", default=DEFAULT_INPUT,
                        help="a folder, one image or video file, or a glob in quotes (default: %(default)s)")
    parser.add_argument("--output", help=f"output folder, created if missing (default: {DEFAULT_OUTPUT}; "
                                          f"{DEFAULT_EVAL_OUTPUT} with --evaluate)")
    parser.add_argument("--image_size", type=size_arg,
                        help="model input WxH (default: the --image_size the checkpoint records)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="images per forward pass; on a CPU, a video's go half to each of two model workers "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="autocast dtype; auto: float32 on every CPU (the same masks on any CPU and from the "
                             "ONNX export; bf16 is faster where the CPU computes it natively but changes a few pixels, "
                             "see docs/precision.md), bf16 on GPUs (fp16 where bf16 is not native) "
                             "(default: %(default)s)")
    parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                        help="NHWC memory format; auto: on (the faster layout for inference on CPUs and GPUs) "
                             "(default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader processes that decode and resize (default: %(default)s)")
    parser.add_argument("--writer_threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads that encode and write the output images (default: %(default)s)")
    parser.add_argument("--label_ids", action="store_true",
                        help="Cityscapes models: masks hold Cityscapes label ids (the official format) instead "
                             "of class indices (default: class indices)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the palette in the overlay (default: %(default)s)")
    parser.add_argument("--tta", choices=tuple(TTA_SCALES), default="none",
                        help="test-time augmentation: flip averages the class probabilities of each photo and its "
                             "mirror image (2 forward passes), ms also over 0.75x and 1.25x the training size (6 "
                             "passes) (default: %(default)s)")
    parser.add_argument("--save_confidence", action="store_true",
                        help="also write NAME_confidence.png beside each mask: the top class's probability as 8-bit "
                             "gray, 255 = 1.0 (default: off)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="leave inputs whose outputs all exist as they are, so a long run that was stopped "
                             "goes on where it stopped (default: every input is written)")
    videos = parser.add_argument_group(f"videos (mp4, mkv, mov, avi, webm, ...; need pip install -r "
                                       f"{video.VIDEO_REQUIREMENTS})")
    videos.add_argument("--frames", action="store_true",
                        help="also write each frame's mask as OUTPUT/NAME/000123_mask.png (default: only the "
                             "overlay video OUTPUT/NAME_overlay.mp4)")
    videos.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="average each pixel's class probabilities over the last N frames before the argmax, "
                             "against flicker; 1 is off (default: %(default)s)")
    parser.add_argument("--export", metavar="MODEL.onnx",
                        help=f"write the checkpoint as an ONNX model instead of segmenting; needs pip install -r "
                             f"{EXPORT_REQUIREMENTS} (default: no export)")
    parser.add_argument("--int8", action="store_true",
                        help="with --export: quantize the model to int8 (ONNX Runtime's static quantization, "
                             "calibrated on up to 100 train photos of --data_root; needs pip install -r "
                             "requirements-onnxruntime.txt) (default: float32)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--evaluate", action="store_true",
                            help="score the checkpoint on --data_root/--split (default: segment --input)")
    evaluation.add_argument("--data_root", help="labelled dataset: Cityscapes, CamVid or the folder layout "
                                                "(required with --evaluate and with --export --int8)")
    evaluation.add_argument("--dataset", choices=("auto", "cityscapes", "camvid", "folder"), default="auto",
                            help="layout of --data_root; auto recognises it from its folders (default: %(default)s)")
    evaluation.add_argument("--split", default="val", choices=("train", "val", "test"),
                            help="a labelled split (default: %(default)s)")
    evaluation.add_argument("--save_label_ids", action="store_true",
                            help="Cityscapes: also write full-resolution label-id PNGs for cityscapesscripts to "
                                 "OUTPUT/label_ids (default: off)")
    bare = parser.add_argument_group("bare state_dict checkpoints (only needed where the shapes cannot tell)")
    bare.add_argument("--num_classes", type=int, help="classes the head predicts (default: read from the head's weights)")
    bare.add_argument("--base_channels", type=int, help="channels of the first conv (default: read from its weights)")
    bare.add_argument("--depth", type=int, help="down-sampling steps (default: the one whose shapes match)")
    bare.add_argument("--bilinear", action=argparse.BooleanOptionalAction,
                      help="bilinear upsampling instead of transposed convs (default: the one whose shapes match)")
    bare.add_argument("--input_norm", choices=INPUT_NORMS, help="the normalisation the model was trained with "
                      "(training.py --input_norm), which no weight shape tells (default: dataset)")
    bare.add_argument("--classes", nargs="+", help="class names in index order, as given to training.py; quote "
                      "names with spaces (default: the 19 Cityscapes evaluation classes)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or args.writer_threads < 1 or args.smooth < 1:
        parser.error("--batch_size, --writer_threads and --smooth must be >= 1, --num_workers >= 0")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.evaluate and not args.data_root:
        parser.error("--evaluate needs --data_root")
    if args.evaluate and args.export:
        parser.error("--export and --evaluate are separate runs")
    if args.int8 and not (args.export and args.data_root):
        parser.error("--int8 goes with --export MODEL.onnx and --data_root (its train photos calibrate the model)")
    args.output = args.output or (DEFAULT_EVAL_OUTPUT if args.evaluate else DEFAULT_OUTPUT)
    return args


def load_segmenter(args) -> Segmenter:
    classes = args.classes or CITYSCAPES_EVAL_NAMES
    return Segmenter(args.checkpoint, args.device, args.amp, args.channels_last, args.image_size, classes, args.tta,
                     num_classes=args.num_classes, base_channels=args.base_channels, depth=args.depth,
                     bilinear=args.bilinear, input_norm=args.input_norm)


def main(argv=None):
    args = parse_args(argv)

    def run():
        segmenter = load_segmenter(args)
        if args.export:
            return export_onnx(segmenter, args.export, args.data_root if args.int8 else None)
        return evaluate_split(args, segmenter) if args.evaluate else predict(args, segmenter)

    with interrupted_once():
        return run_cli(run)


@contextlib.contextmanager
def interrupted_once():
    """Ctrl-C (SIGINT) and SIGTERM (kill, a job scheduler's stop) interrupt once: files being written are finished or
    left under temporary names, and a video's overlay so far is closed as a playable file. A second signal during
    that cleanup is ignored, with a line saying so: raised inside it, it would abandon threads part way through their
    files. A third stops at once; what was being written stays under temporary names, which the next run removes."""
    received = []

    def interrupt(signum, frame):
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt
        # os.write, not print: the main thread may be inside a print to stderr, which print cannot re-enter
        if len(received) == 2:
            os.write(2, b"\nstill closing the files being written; signal again to stop at once\n")
            return
        os.write(2, b"stopped at once: unfinished files are left under temporary names (.NAME...), removed by the "
                    b"next run\n")
        os._exit(128 + signum)  # as the signal's own exit would be reported: 130 for Ctrl-C, 143 for SIGTERM

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGINT only where Python would raise KeyboardInterrupt: a job started with SIGINT ignored keeps ignoring it
    signals = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = {number: signal.signal(number, interrupt) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
