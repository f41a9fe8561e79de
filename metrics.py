"""Segmentation metrics on the official Cityscapes pixel-level protocol, the one evaluation of a model on a split,
and the run's metrics log with the training loop's tallies behind it.

One confusion matrix is accumulated over the whole evaluation set and every score is computed from it
once at the end. Averaging per-batch scores instead inflates them: a batch that lacks a class drops it
from its mean, so rare-class failures are diluted by the many batches where the class is absent.
"""
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tqdm import tqdm

from runtime import Stopped, UserError, atomic_write
from unet import upsample_argmax


class ConfusionMatrix:
    """Pixel counts of (ground-truth class, predicted class) over a whole evaluation set.

    Rows are ground truth, columns predictions. Pixels whose target is `ignore_index`
    (or any value outside [0, num_classes)) count nowhere, so predicting something there
    is not a false positive. A prediction outside [0, num_classes) at a valid pixel lands
    in an extra "other" column: a false negative of the true class and a false positive of
    nothing, which is how the official evaluation scores predictions of void label ids.
    """

    def __init__(self, num_classes, ignore_index=255, device="cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        # (C + 1) x (C + 1): the last column is "other" predictions, the last row collects
        # ignored pixels so every pixel has a fixed slot and update() needs no masking.
        self._counts = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64, device=self.device)

    @property
    def matrix(self):
        """(C, C) int64 counts, rows = ground truth, columns = prediction."""
        return self._counts[: self.num_classes, : self.num_classes].clone()

    @torch.no_grad()
    def update(self, pred, target):
        """Add a batch of integer class maps (any shape, same for both) without a host sync.

        Keep `device` equal to the tensors' device: a cross-device copy would sync.
        torch.bincount is avoided because on CUDA it reads the input's max back to the host
        to size its output; index_add_ into the fixed-size buffer never does, and integer
        atomic adds are exact and order independent.
        """
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"pred and target must hold integer class ids (argmax the logits first), "
                             f"got {pred.dtype} and {target.dtype}")
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        num_classes = self.num_classes
        pred = pred.to(self.device, torch.int64).flatten()
        target = target.to(self.device, torch.int64).flatten()
        valid = (target >= 0) & (target < num_classes) & (target != self.ignore_index)
        row = torch.where(valid, target, num_classes)
        col = torch.where((pred >= 0) & (pred < num_classes), pred, num_classes)
        self._counts.view(-1).index_add_(0, row * (num_classes + 1) + col, torch.ones_like(row))

    def all_reduce(self):
        """Sum the counts of all ranks (DDP evaluation); a no-op without torch.distributed.

        Sums of counts are exact, unlike averaging per-rank scores. With NCCL the matrix
        must live on the rank's GPU (`device`).
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)

    def compute(self):
        """Scores from the accumulated counts; a class with TP + FP + FN == 0 gets NaN and is
        left out of every mean, as in the official evaluation."""
        counts = self._counts[: self.num_classes].cpu().double()  # ignored row dropped
        true_pos = counts.diagonal()
        gt_pixels = counts.sum(1)  # TP + FN, "other" predictions included
        pred_pixels = counts[:, : self.num_classes].sum(0)  # TP + FP, valid pixels only
        union = gt_pixels + pred_pixels - true_pos
        iou = true_pos / union  # 0 / 0 -> NaN
        dice = 2 * true_pos / (gt_pixels + pred_pixels)
        total = gt_pixels.sum()
        return {
            "iou": iou,
            "dice": dice,
            "miou": iou.nanmean().item(),
            # classes absent from ground truth have weight 0 (their IoU may be NaN)
            "fwiou": ((gt_pixels * iou).nansum() / total).item(),
            "pixel_acc": (true_pos.sum() / total).item(),
            "mean_acc": (true_pos / gt_pixels).nanmean().item(),
        }


def finite_or_none(value):
    """A score for JSON: undefined (NaN) becomes null, since JSON has no NaN."""
    return None if math.isnan(value) else value


def format_table(results, class_names):
    """Per-class IoU / Dice table plus the summary lines, for logs and the terminal."""
    if len(class_names) != len(results["iou"]):
        raise ValueError(f"got {len(class_names)} class names for {len(results['iou'])} classes")
    width = max(len("class"), *(len(name) for name in class_names))

    def number(value):
        return "   n/a" if math.isnan(value) else f"{value:6.4f}"

    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}"]
    for name, iou, dice in zip(class_names, results["iou"].tolist(), results["dice"].tolist()):
        lines.append(f"{name:<{width}}  {number(iou)}  {number(dice)}")
    for label, key in (("mIoU", "miou"), ("fwIoU", "fwiou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_acc")):
        lines.append(f"{label:<{width}}  {number(results[key])}")
    return "\n".join(lines)


def scores(results, class_names):
    """The summary scores and per-class IoU of ConfusionMatrix.compute() as JSON-ready values."""
    summary = {key: finite_or_none(results[key]) for key in ("miou", "fwiou", "pixel_acc", "mean_acc")}
    return {**summary, "per_class_iou": {name: finite_or_none(iou)
                                         for name, iou in zip(class_names, results["iou"].tolist())}}


@torch.inference_mode()
def score_split(class_scores, loader, num_classes, device, max_batches=0, each_batch=None) -> ConfusionMatrix:
    """The one evaluation of a model on a labelled split, used by training and inference.py --evaluate alike: over
    `loader`'s (indices, inputs, masks) batches (the first `max_batches`, 0 = all), each image's class scores
    (class_scores(inputs), at the training size) upsampled bilinearly to its mask's own size, argmax, counted in one
    confusion matrix on `device`. each_batch(indices, scores, masks, predictions), if given, sees every batch."""
    confusion = ConfusionMatrix(num_classes, device=device)
    for batch_index, (indices, inputs, masks) in enumerate(loader):
        if max_batches and batch_index >= max_batches:
            break
        batch_scores = class_scores(inputs)
        masks = [mask.to(device, non_blocking=True) for mask in masks]
        predictions = [upsample_argmax(image_scores, mask.shape) for image_scores, mask in zip(batch_scores, masks)]
        for prediction, mask in zip(predictions, masks):
            confusion.update(prediction, mask)
        if each_batch is not None:
            each_batch(indices, batch_scores, masks, predictions)
    return confusion


class MetricsLog:
    """metrics.jsonl: one JSON object per line, a training log record or an evaluation; this class is its
    one writer and reader."""

    def __init__(self, path):
        self.path = Path(path)

    def read(self) -> list:
        """Every complete record; a last line that a kill cut short (no newline yet) is left out."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().split("\n")[:-1], 1):
            try:
                records.append(json.loads(line)) if line.strip() else None
            except json.JSONDecodeError:
                raise UserError(f"{self.path}: line {number} is not a JSON record; move the file away to start its "
                                f"log afresh") from None
        return records

    def append(self, record):
        try:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            raise OSError(error.errno, f"could not write it ({error.strerror or error})", str(self.path)) from None

    def keep_until(self, step):
        """Drop the records after `step` (what a killed run logged after its last checkpoint), atomically."""
        text = "".join(json.dumps(record) + "\n" for record in self.read() if record["step"] <= step)
        atomic_write(self.path, lambda file: file.write(text.encode()))


DATA_WAIT_HINT = 0.25  # share of the time spent waiting for batches above which training says so, once


class TrainLogger:
    """Per-step tallies kept on the device (the loop never waits for the GPU), read back once per log
    interval into a metrics.jsonl record. Also stops a run of non-finite steps and says once when the
    input pipeline, not the model, sets the pace."""

    def __init__(self, device, nonfinite_steps, images_per_step, train_images, batches, world_size, max_nonfinite):
        self.loss, self.steps, self.bad_run, self.longest_bad_run = (torch.zeros((), device=device) for _ in range(4))
        self.nonfinite_total = torch.tensor(float(nonfinite_steps), device=device)
        self.logged_nonfinite = nonfinite_steps
        self.images_per_step, self.train_images, self.batches = images_per_step, train_images, batches
        self.world_size, self.max_nonfinite = world_size, max_nonfinite
        self.interval_steps, self.intervals, self.slow_input_named, self.start = 0, 0, False, time.perf_counter()

    def update(self, loss, finite):
        self.loss += torch.where(finite, loss, 0.0)
        self.steps += finite
        self.nonfinite_total += ~finite
        self.bad_run = torch.where(finite, 0.0, self.bad_run + 1)
        self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_run)
        self.interval_steps += 1

    def nonfinite_steps(self) -> int:
        """Skipped steps so far (a host sync: for checkpoints, not for every step)."""
        return int(self.nonfinite_total.item())

    def record(self, step, lr, grad_norm) -> dict:
        """The interval's record (a host sync); raises Stopped after --max_nonfinite_steps bad steps."""
        if self.world_size > 1:
            dist.all_reduce(self.loss)
        elapsed = time.perf_counter() - self.start
        loss_sum, finite_steps, nonfinite_total, longest_bad_run, norm = torch.stack(
            [self.loss, self.steps, self.nonfinite_total, self.longest_bad_run, grad_norm]).tolist()
        skipped, self.logged_nonfinite = int(nonfinite_total) - self.logged_nonfinite, int(nonfinite_total)
        if skipped:
            tqdm.write(f"step {step}: {skipped} step(s) since the last log had non-finite gradients and were skipped")
        if longest_bad_run >= self.max_nonfinite:
            raise Stopped(f"error: {int(longest_bad_run)} consecutive non-finite steps (at step {step}); "
                          f"lower --base_lr or --grad_clip, or try --amp off")
        record = {"step": step, "epoch": step * self.images_per_step // self.train_images,
                  "train_loss": loss_sum / (finite_steps * self.world_size) if finite_steps else None, "lr": lr,
                  "grad_norm": norm, "img_per_s": self.interval_steps * self.images_per_step / elapsed,
                  "nonfinite_steps": self.logged_nonfinite, "data_wait": self.batches.waited / elapsed}
        self.intervals += 1
        # the first interval also holds the loader workers' start-up
        if record["data_wait"] > DATA_WAIT_HINT and self.intervals > 1 and not self.slow_input_named:
            self.slow_input_named = True
            tqdm.write(f"step {step}: {record['data_wait']:.0%} of the time went to waiting for batches: the input "
                       "pipeline sets the pace; more --num_workers, data prepared at the training size (python "
                       "dataset.py prepare) or --data_cache device would speed training up")
        for tally in (self.loss, self.steps, self.longest_bad_run):
            tally.zero_()
        self.interval_steps, self.start, self.batches.waited = 0, time.perf_counter(), 0.0
        return record
