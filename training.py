"""Train the U-Net on Cityscapes, CamVid, your own photos, or the built-in synthetic city.

    python training.py                                   # Dataset/cityscapes if present, else the synthetic demo
    python training.py --data_root ../shared/camvid      # the data decides the preset (here: camvid)
    python training.py --preset synthetic --training_iterations 600
    python training.py --resume auto                     # continue the newest run in runs/, exactly
    torchrun --standalone --nproc_per_node=4 training.py # DDP, one process per GPU

The run folder (--out_dir) gets config.json, metrics.jsonl, plots, snapshots of fixed val images at every
evaluation, checkpoint.pt (the full training state) and best_model.pth; --model_path gets the weights with
the best val mIoU. A resumed run continues bit for bit (same device, thread count and world size).
"""
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import synthetic_city
from batches import TimedBatches, loader_options, train_batches
from checkpoint import CHECKPOINT_FILE, Progress, restore, save_checkpoint
from config import COMPUTED_CLASS_WEIGHTS, TrainConfig, build_parser, from_command_line
from dataset import IGNORE_INDEX, MEAN, STD, Indexed, SegmentationDataset, collate_indexed, denormalize, open_layout
from losses import CEDiceLoss, logit_shift, median_frequency_weights
from lr_schedule import WarmupInverseSqrtLR
from metrics import MetricsLog, format_table, score_split, scores
from runtime import (INTERRUPTED_EXIT_CODE, Stopped, UserError, atomic_write, autocast_dtype, keep_freed_memory,
                     resolve_device, run_cli, use_channels_last)
from unet import Predictor, UNet, save_weights, weights_dict
from visualize import plot_confusion_matrix, plot_per_class_iou, plot_training_curves, save_prediction_grid

BEST_WEIGHTS_FILE = "best_model.pth"
SNAPSHOT_IMAGES = 4
DATA_WAIT_HINT = 0.25  # share of the time spent waiting for batches above which training says so, once
SYNTHETIC_SEED = 0  # the synthetic city is data, not a training choice: the same scenes whatever --seed is


# ----------------------------------------------------------------------------- setup

def setup_device(config, local_rank):
    """Device, process group and backend flags -> (device, autocast dtype or None, memory format)."""
    device = resolve_device(config.device, local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # the step's large activations are reused instead of page-faulted in anew
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark and not config.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if config.world_size > 1 and not dist.is_initialized():
        init_distributed("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=config.dist_timeout))
    if config.sync_bn and config.world_size > 1 and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
    memory_format = torch.channels_last if use_channels_last(config.channels_last, device, training=True) \
        else torch.contiguous_format
    return device, autocast_dtype(config.amp, device), memory_format


def init_distributed(backend, timeout):
    """The default process group; `timeout` bounds every wait, so a round that cannot form fails and torchrun
    retries. On one node torchrun keeps one store for all its restarts, so a restarted round could read the killed
    round's addresses and fail to connect, or wait on them forever: the keys go in a namespace of this round. Each
    node's agent counts its own restarts, so on several nodes that count is no shared round name: there, torchrun
    must give each round a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README's command sets)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) == 1:
        store = dist.PrefixStore(f"restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    elif int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and rank == 0 \
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        print("warning: several nodes share torchrun's store across restarts; start torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that a restarted round cannot meet the previous round's keys")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def prepare_synthetic_city(root, num_train, num_val, size):
    """Generate the synthetic city at root, or finish an interrupted generation (a no-op when complete).
    A city made with other settings, e.g. by `python synthetic_city.py`, is the user's data: used as it is."""
    made_with = synthetic_city.read_settings(root)
    if made_with in (None, synthetic_city.settings_for(num_train, num_val, size, SYNTHETIC_SEED)):
        synthetic_city.generate(root, num_train, num_val, size=size, seed=SYNTHETIC_SEED)
    else:
        width, height = made_with["size"]
        print(f"{root}: using the synthetic city there as it is ({width}x{height}, {made_with['num_train']} train "
              f"and {made_with['num_val']} val images); --synthetic_train and --synthetic_val apply to new cities")


@dataclass
class Data:
    train: object  # endless (images, masks) micro-batches of this rank, timed
    val: DataLoader  # this rank's shard of the val split, masks at the labels' own resolution
    snapshot: list  # [images, masks] of fixed val images at the training size
    class_table: object
    train_images: int


def build_data(config, rank, device, samples_seen):
    """Train batches (the seeded global stream, from the samples_seen-th image on), this rank's val loader,
    snapshot images; resolves --class_weights, which needs the train masks."""
    root = config.data_root
    if config.dataset == "synthetic":
        if rank == 0:
            prepare_synthetic_city(root, config.synthetic_train, config.synthetic_val, config.size)
        if config.world_size > 1:
            dist.barrier()
    layout = open_layout(root, "cityscapes" if config.dataset == "synthetic" else config.dataset, config.train_id_files)
    class_table = layout.class_table(config.classes)
    common = dict(image_size=config.size, classes=class_table, layout=layout)
    resolve_class_statistics(config, SegmentationDataset(root, "train", **common), rank)
    paste_classes = [class_table.names.index(name) for name in config.paste_classes or ()]
    train_set = SegmentationDataset(root, "train", augment=True, scale_range=config.scale_range,
                                    hflip_prob=config.hflip_prob, color_jitter=config.color_jitter,
                                    crop_size=config.crop, paste_prob=config.copy_paste,
                                    paste_classes=paste_classes, **common)
    val_set = SegmentationDataset(root, "val", label_resolution=True, **common)
    snapshot_set = SegmentationDataset(root, "val", **common)
    shard = Subset(val_set, range(rank, len(val_set), config.world_size))
    val = DataLoader(Indexed(shard), batch_size=config.batch_size, collate_fn=collate_indexed,
                     **loader_options(config.num_workers, device, config.seed))
    snapshot_ids = sorted(set(np.linspace(0, len(val_set) - 1, SNAPSHOT_IMAGES).round().astype(int).tolist()))
    snapshot = [torch.stack(tensors) for tensors in zip(*(snapshot_set[i] for i in snapshot_ids))]
    train = TimedBatches(train_batches(train_set, config, rank, config.world_size, device, samples_seen))
    return Data(train, val, snapshot, class_table, len(train_set))


def build_optimizer(model, config):
    """AdamW (decoupled weight decay, Loshchilov & Hutter) on conv weights only: decaying BatchNorm scales
    fights the normalisation, and biases are too few to overfit. The fused kernel can skip a step on the
    device (step_unless_nonfinite)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.base_lr, fused=True)


def build_training(config, num_classes, device, memory_format, amp_dtype):
    """U-Net (the same initial weights on every rank), AdamW, LR schedule and GradScaler (fp16 only). With
    --logit_adjustment the head's bias starts at minus the loss's logit shift (losses.logit_shift)."""
    torch.manual_seed(config.seed)
    model = UNet(3, num_classes, config.base_channels, config.depth, config.dropout, config.bilinear)
    if config.logit_adjustment and config.class_weight_values:
        with torch.no_grad():
            model.head.bias -= logit_shift(config.class_weight_values, config.logit_adjustment)
    if config.sync_bn and config.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, config)
    scheduler = WarmupInverseSqrtLR(optimizer, config.warmup_steps, config.decay_factor, config.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return model, optimizer, scheduler, scaler


def resolve_class_statistics(config, train_set, rank):
    """What the train masks decide, found once and kept in the config so that a resume uses the same: the class
    weights (config.class_weight_values, from --class_weights) and, unless --paste_classes names them, the classes
    that --copy_paste pastes (median-frequency weight above 1, i.e. rarer than the median class). The masks are
    scanned once, on rank 0, and the result shared with the other ranks."""
    names = train_set.class_table.names
    if config.paste_classes:
        config.paste_classes = known_paste_classes(config.paste_classes, names)
    needs_weights = config.class_weights in COMPUTED_CLASS_WEIGHTS and config.class_weight_values is None
    needs_paste_classes = config.copy_paste > 0 and config.paste_classes is None
    balancing = None
    if needs_weights or needs_paste_classes:
        balancing = [median_frequency_weights(*train_set.class_pixels()).tolist() if rank == 0 else None]
        if config.world_size > 1:
            dist.broadcast_object_list(balancing)
        balancing = balancing[0]
    resolve_class_weights(config, names, balancing, rank)
    resolve_paste_classes(config, names, balancing, rank)


def known_paste_classes(paste_classes, names):
    """--paste_classes as class names, checked before any mask is scanned; a run started before the classes were
    stored by name stored their indices, which are converted."""
    paste_classes = tuple(names[c] if isinstance(c, int) and 0 <= c < len(names) else c for c in paste_classes)
    unknown = [name for name in paste_classes if name not in names]
    if unknown:
        raise UserError(f"--paste_classes: {unknown} not among the classes trained ({', '.join(names)})")
    return paste_classes


def resolve_paste_classes(config, names, balancing, rank):
    """config.paste_classes, unless --paste_classes named them: with --copy_paste, the classes whose
    median-frequency weight in `balancing` is above 1; printed when pasting is on."""
    if config.copy_paste == 0:
        return
    if config.paste_classes is None:
        config.paste_classes = tuple(names[c] for c, weight in enumerate(balancing) if weight > 1)
    if rank == 0:
        print(f"copy-paste ({config.copy_paste:g} of the train photos): "
              + (", ".join(config.paste_classes) or "none, no class is rarer than the median"))


def resolve_class_weights(config, names, balancing, rank):
    """config.class_weight_values from --class_weights (auto: the median-frequency weights `balancing`, sqrt:
    their square root; a file: one number per class), once."""
    if config.class_weights == "none" or config.class_weight_values is not None:
        return
    if config.class_weights in COMPUTED_CLASS_WEIGHTS:
        weights = balancing if config.class_weights == "auto" else [math.sqrt(weight) for weight in balancing]
    else:
        try:
            weights = [float(word) for word in Path(config.class_weights).read_text().split()]
        except ValueError:
            raise UserError(f"{config.class_weights}: --class_weights expects a file of numbers, one per class") from None
        if len(weights) != len(names) or not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise UserError(f"{config.class_weights}: {len(weights)} weights for {len(names)} classes; give one number "
                            f">= 0 per class ({', '.join(names)}), not all 0")
    config.class_weight_values = tuple(float(f"{weight:.4g}") for weight in weights)
    if rank == 0:
        print("class weights: " + ", ".join(f"{name} {weight:g}" for name, weight in zip(names,
                                                                                        config.class_weight_values)))


class WeightAverage:
    """Exponential moving average of a model's weights and BatchNorm statistics (timm's ModelEmaV2), evaluated and
    saved instead of the raw weights: it smooths out the last steps of a schedule that does not anneal. Its decay
    ramps up as min(decay, (1 + n) / (10 + n)), so the first averages are not the initial weights."""

    def __init__(self, model, decay):
        self.model, self.decay, self.updates = copy.deepcopy(model).eval().requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = [(mine, theirs) for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values())]
        torch._foreach_lerp_([m for m, t in pairs if m.is_floating_point()],
                             [t for m, t in pairs if m.is_floating_point()], 1 - decay)
        for mine, theirs in pairs:
            if not mine.is_floating_point():
                mine.copy_(theirs)

    def load_state_dict(self, checkpoint):
        """From a training checkpoint, whose "model" is the average (see save_progress)."""
        self.model.load_state_dict(checkpoint["model"])
        self.updates = checkpoint["average_updates"]


def compiled(module, config):
    """The module as the training step calls it: torch.compile'd under --compile."""
    return torch.compile(module) if config.compile else module


# ----------------------------------------------------------------------------- one step

def step_unless_nonfinite(optimizer, finite):
    """optimizer.step(), made a no-op on the device when the bool tensor `finite` is False: the fused AdamW
    reads a `found_inf` tensor (GradScaler's contract with fused optimizers) and, where it is 1, leaves
    weights, moments and step count untouched, with no host sync."""
    optimizer.found_inf = (~finite).float()
    optimizer.grad_scale = None  # gradients are already unscaled
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def train_step(model, batches, accum_steps, loss_fn, optimizer, scaler, autocast, grad_clip, device,
               memory_format=torch.contiguous_format):
    """One optimizer step over `accum_steps` micro-batches -> (mean loss, pre-clip grad norm, finite), all
    on the device: nothing here waits for the GPU.

    Each micro-batch loss is divided by accum_steps, so the gradients are those of the mean loss; DDP's
    no_sync skips the all-reduce on all but the last micro-batch. A step whose grad norm is not finite is
    skipped, weights, optimizer state and BatchNorm statistics alike. Under DDP the norm is of the
    all-reduced gradients, so every rank makes the same decision."""
    buffers = list(model.buffers())  # BatchNorm statistics: updated by the forward passes, restored on a skip
    buffers_before = [buffer.clone() for buffer in buffers]
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        images, masks = next(batches)
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        last = micro_step == accum_steps - 1
        with contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with autocast():
                loss = loss_fn(model(images), masks) / accum_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    finite = torch.isfinite(grad_norm)
    step_unless_nonfinite(optimizer, finite)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    for buffer, before in zip(buffers, buffers_before):
        buffer.copy_(torch.where(finite, buffer, before))
    return loss_sum, grad_norm, finite


# ----------------------------------------------------------------------------- evaluation

def validate(predictor, loader, loss_fn, num_classes, max_batches=0):
    """(val loss, metrics, confusion matrix) of `predictor` over `max_batches` batches (0 = all) of each rank's shard,
    summed over ranks: metrics.score_split, the evaluation inference.py --evaluate runs, so its scores are those of
    --evaluate on the same weights. The loss is of the logits upsampled to the labels' size, averaged per image."""
    totals = torch.zeros(2, dtype=torch.float64, device=predictor.device)  # loss * images, images

    def add_loss(indices, logits, masks, predictions):
        if all(mask.shape == logits.shape[-2:] for mask in masks):
            pairs = [(logits, torch.stack(masks))]  # labels at the training size: one loss over the batch
        else:  # at the labels' own size, one image at a time: memory stays that of one full-size image
            pairs = [(F.interpolate(image_logits[None], size=mask.shape, mode="bilinear", align_corners=False),
                      mask[None]) for image_logits, mask in zip(logits, masks)]
        for batch_logits, batch_masks in pairs:
            totals[0] += loss_fn(batch_logits, batch_masks).double() * len(batch_masks)
        totals[1] += len(masks)

    matrix = score_split(predictor.logits, loader, num_classes, predictor.device, max_batches, add_loss)
    matrix.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item(), matrix.compute(), matrix.matrix.cpu()


@torch.inference_mode()
def save_snapshot(predictor, snapshot, class_table, path):
    """image | ground truth | prediction of the fixed val images."""
    images, masks = snapshot
    predictions = predictor.logits(images).argmax(1).cpu()
    save_prediction_grid(path, [denormalize(image) for image in images], list(masks), list(predictions), class_table)


# ----------------------------------------------------------------------------- logging

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


class StopRequest:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the step, save a checkpoint, exit; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint after this step (under torchrun: at the next log step; Ctrl-C "
              "again to abort)", file=sys.stderr)

    def agreed(self, device):
        """Under DDP every rank stops at the same step: the flag is max-reduced."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the run

def seed_everything(seed, rank):
    """The global RNGs (dropout) differ per rank; data order and augmentation have seeds of their own."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


@dataclass
class Run:
    """Everything one training run holds, built by start_run()."""

    config: TrainConfig
    rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupInverseSqrtLR
    scaler: torch.amp.GradScaler
    loss_fn: CEDiceLoss
    average: WeightAverage | None
    progress: Progress = field(default_factory=Progress)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @property
    def eval_model(self):
        """What is evaluated and saved: the weight average with --ema_decay, else the model itself."""
        return self.average.model if self.average else self.model

    def weights_info(self):
        """What the weights file records beside the weights (unet.weights_dict's arguments)."""
        table = self.data.class_table
        return dict(class_names=table.names, class_colors=table.colors, image_size=self.config.size, mean=MEAN, std=STD,
                    dataset=self.config.dataset)


def save_progress(run, logger):
    """The training checkpoint of where the run stands (every rank calls it; rank 0 writes). It holds the
    evaluated weights under "model", as the weights file does; with --ema_decay the trained ones as well."""
    run.progress.nonfinite_steps = logger.nonfinite_steps()
    run.progress.epoch = run.progress.samples_seen // run.data.train_images
    trained = {"trained_model": weights_dict(run.model, **run.weights_info())["model"],
               "average_updates": run.average.updates} if run.average else {}
    save_checkpoint(run.run_dir / CHECKPOINT_FILE, {**weights_dict(run.eval_model, **run.weights_info()), **trained},
                    run.optimizer, run.scheduler, run.scaler, run.config, run.progress, run.rank, run.config.world_size)


def start_run(config, checkpoint, rank, local_rank) -> Run:
    """Device, data, model and optimizer, restored from the checkpoint when resuming."""
    device, amp_dtype, memory_format = setup_device(config, local_rank)
    data = build_data(config, rank, device, checkpoint["samples_seen"] if checkpoint else 0)
    model, optimizer, scheduler, scaler = build_training(config, data.class_table.num_classes, device, memory_format,
                                                         amp_dtype)
    loss_fn = CEDiceLoss(data.class_table.num_classes, IGNORE_INDEX, config.ce_weight, config.dice_weight,
                         config.class_weight_values, ohem_threshold=config.ohem_threshold,
                         lovasz_weight=config.lovasz_weight, logit_adjustment=config.logit_adjustment,
                         dice_per_image=config.dice_per_image).to(device)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    run = Run(config, rank, device, amp_dtype, memory_format, data, model, optimizer, scheduler, scaler, loss_fn, average)
    seed_everything(config.seed, rank)
    if checkpoint:
        run.progress = restore(checkpoint, model, optimizer, scheduler, scaler, rank, config.world_size)
        if average:
            average.load_state_dict(checkpoint)
    return run


def open_run_folder(run):
    """Rank 0: the run folder with config.json, and metrics.jsonl without what a kill left after the checkpoint."""
    Path(run.config.model_path).parent.mkdir(parents=True, exist_ok=True)  # fail now, not after training
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "snapshots").mkdir(exist_ok=True)
    for stale in run.run_dir.glob(".*.tmp"):  # what a kill left of an atomic write; the previous file is intact
        stale.unlink()
    run.config.save(run.run_dir / "config.json")
    MetricsLog(run.run_dir / "metrics.jsonl").keep_until(run.progress.step)


def evaluate(run, max_batches=0, final=False):
    """Validate, log, snapshot, and keep the best weights (rank 0 writes); returns (results, confusion). The model is
    scored as inference.py runs it (a BatchNorm-folded copy, inference's precision and layout on this device)."""
    step, table = run.progress.step, run.data.class_table
    predictor = Predictor(copy.deepcopy(run.eval_model), run.device)
    val_loss, results, confusion = validate(predictor, run.data.val, run.loss_fn, table.num_classes, max_batches)
    if run.rank == 0:
        MetricsLog(run.run_dir / "metrics.jsonl").append(
            {"step": step, "val_loss": val_loss if math.isfinite(val_loss) else None, **scores(results, table.names),
             "val_pixels": int(confusion.sum()), "final": final})
        save_snapshot(predictor, run.data.snapshot, table, run.run_dir / "snapshots" / f"step_{step:06d}.png")
        # whole-split evaluations compete for the best weights: the first always saves (its mIoU is NaN when no
        # val pixel is labelled), a later one replaces a worse or an undefined best
        best = run.progress.best_miou
        better = run.progress.best_step is None or results["miou"] > best or math.isnan(best)
        if better and (max_batches == 0 or run.progress.best_step is None):
            run.progress.best_miou, run.progress.best_step = results["miou"], step
            save_weights(run.run_dir / BEST_WEIGHTS_FILE, run.eval_model, **run.weights_info())
        tqdm.write(f"step {step}: val loss {val_loss:.4f}, mIoU {results['miou']:.4f}, "
                   f"pixel acc {results['pixel_acc']:.4f}")
    return results, confusion


def finish(run, logger):
    """Final evaluation on the whole val split, the best weights, plots, and last the final checkpoint: a kill
    before it leaves a run that --resume completes."""
    results, confusion = evaluate(run, final=True)
    if run.rank == 0:
        best = (run.run_dir / BEST_WEIGHTS_FILE).read_bytes()
        atomic_write(run.config.model_path, lambda file: file.write(best))
        records = MetricsLog(run.run_dir / "metrics.jsonl").read()
        names = run.data.class_table.names
        plot_training_curves(records, run.run_dir / "training_curves.png")
        plot_per_class_iou([r for r in records if "miou" in r][-1], names, run.run_dir / "per_class_iou.png")
        plot_confusion_matrix(confusion, names, run.run_dir / "confusion_matrix.png")
    save_progress(run, logger)
    if run.rank == 0:
        print(format_table(results, names))
        print(f"final weights: val mIoU {results['miou']:.4f}; best weights (step {run.progress.best_step}, val mIoU "
              f"{run.progress.best_miou:.4f}) saved to {run.config.model_path}; run folder {run.run_dir}")


def train(config, checkpoint, rank=0, local_rank=0):
    """The training loop, in phases: build the run, then step, log, evaluate, checkpoint, until done."""
    run = start_run(config, checkpoint, rank, local_rank)
    if rank == 0:
        print(json.dumps(config.to_dict(), indent=2))
        open_run_folder(run)
    train_model = compiled(run.model, config)
    if config.world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    train_loss_fn = compiled(run.loss_fn, config)
    metrics = MetricsLog(run.run_dir / "metrics.jsonl")
    logger = TrainLogger(run.device, run.progress.nonfinite_steps, config.global_batch, run.data.train_images,
                         run.data.train, config.world_size, config.max_nonfinite_steps)
    stop, total = StopRequest(), config.training_iterations
    bar = tqdm(total=total, initial=run.progress.step, disable=rank != 0, unit="step", dynamic_ncols=True)
    try:
        while run.progress.step < total:
            lr = run.optimizer.param_groups[0]["lr"]
            loss, grad_norm, finite = train_step(train_model, run.data.train, config.accum_steps, train_loss_fn,
                                                 run.optimizer, run.scaler, run.autocast, config.grad_clip, run.device,
                                                 run.memory_format)
            run.scheduler.step()
            if run.average:
                run.average.update(run.model)
            run.progress.step = step = run.progress.step + 1
            run.progress.samples_seen += config.global_batch
            logger.update(loss, finite)
            bar.update()

            log_now = step % config.log_interval == 0 or step == total
            if log_now:
                record = logger.record(step, lr, grad_norm)
                if rank == 0:
                    metrics.append(record)
                    bar.set_postfix(loss=f"{record['train_loss'] or math.nan:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{record['img_per_s']:.1f}")
            if step % config.eval_interval == 0 and step < total:
                evaluate(run, config.eval_iterations)
            if step % config.save_model_interval == 0 and step < total:
                save_progress(run, logger)
            # a checkpoint at the last step would read as a finished run, so the last step just finishes. Under
            # DDP, agreeing to stop is a collective that waits for the GPU, so ranks agree at log steps only.
            if step < total and (config.world_size == 1 or log_now) and stop.agreed(run.device):
                save_progress(run, logger)
                raise Stopped(f"interrupted at step {step}; checkpoint saved to {run.run_dir / CHECKPOINT_FILE}; "
                              f"continue with --resume {run.run_dir / CHECKPOINT_FILE}", INTERRUPTED_EXIT_CODE)
        bar.close()
        finish(run, logger)
    except torch.OutOfMemoryError:
        raise Stopped(f"error: out of GPU memory at --batch_size {config.batch_size}; try --batch_size "
                      f"{max(config.batch_size // 2, 1)} --accum_steps {config.accum_steps * 2} (same images per "
                      f"step)") from None
    finally:
        stop.restore()
        bar.close()


# ----------------------------------------------------------------------------- command line

def run_training(argv):
    args = build_parser(__doc__).parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints; errors still reach stderr
    try:
        config, checkpoint = from_command_line({k: v for k, v in vars(args).items() if v is not None}, world_size)
        if checkpoint and checkpoint["step"] >= config.training_iterations:
            print(f"{config.resume}: already complete ({checkpoint['step']} steps); raise --training_iterations to "
                  f"train further")
            return 0
        train(config, checkpoint, rank, int(os.environ.get("LOCAL_RANK", 0)))
    except FloatingPointError as error:  # non-finite weights, never saved
        raise Stopped(f"error: {error}") from None
    except Stopped as stopped:  # every rank stops at the same step for the same reason: rank 0 says it
        raise stopped if rank == 0 else Stopped("", stopped.exit_code) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    """Errors (bad data, flags or paths, also when a DataLoader worker hit them) end in one line and an exit
    status: 2 for bad input, 1 for a run that cannot go on, 130 when interrupted."""
    status = run_cli(run_training, argv)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
