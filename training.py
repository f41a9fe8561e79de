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
import dataclasses
import json
import math
import os
import random
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
from config import TrainConfig, build_parser, from_command_line, with_class_statistics
from dataset import IGNORE_INDEX, MEAN, STD, Indexed, SegmentationDataset, collate_indexed, denormalize, open_layout
from losses import CEDiceLoss, logit_shift
from lr_schedule import WarmupInverseSqrtLR
from metrics import MetricsLog, TrainLogger, format_table, score_split, scores
from runtime import (INTERRUPTED_EXIT_CODE, Stopped, StopRequest, UserError, atomic_write, autocast_dtype,
                     init_distributed, keep_freed_memory, precision_name, remove_stale_temp_files, resolve_device,
                     run_cli, use_channels_last)
from unet import Predictor, UNet, save_weights, weights_dict
from visualize import plot_confusion_matrix, plot_per_class_iou, plot_training_curves, save_prediction_grid

BEST_WEIGHTS_FILE = "best_model.pth"
SNAPSHOT_IMAGES = 4


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


@dataclass
class Data:
    train: object  # endless (images, masks) micro-batches of this rank, timed
    val: DataLoader  # this rank's shard of the val split, masks at the labels' own resolution
    snapshot: list  # [images, masks] of fixed val images at the training size
    class_table: object
    train_images: int


def open_data(config, rank):
    """(layout, class table) of the data at --data_root; the synthetic city is generated first when it is the data."""
    if config.dataset == "synthetic":
        if rank == 0:
            synthetic_city.prepare_for_training(config.data_root, config.synthetic_train, config.synthetic_val,
                                                config.size)
        if config.world_size > 1:
            dist.barrier()
    layout = open_layout(config.data_root, "cityscapes" if config.dataset == "synthetic" else config.dataset,
                         config.train_id_files)
    return layout, layout.class_table(config.classes)


def build_data(config, layout, class_table, rank, device, samples_seen):
    """Train batches (the seeded global stream, from the samples_seen-th image on), this rank's val loader,
    snapshot images."""
    root, common = config.data_root, dict(image_size=config.size, classes=class_table, layout=layout)
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
    model = UNet(3, num_classes, config.base_channels, config.depth, config.dropout, config.bilinear, config.input_norm)
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
    """optimizer.step(), a no-op on the device where the bool tensor `finite` is False, with no host sync. This is
    the contract torch.amp.GradScaler.step keeps with fused optimizers: the fused AdamW reads the `found_inf` and
    `grad_scale` attributes and, where found_inf is 1, leaves weights, moments and step count untouched. GradScaler
    itself serves fp16 only: enabled for float32 or bf16 it would also rescale the loss after every skipped step."""
    optimizer.found_inf = (~finite).float()
    optimizer.grad_scale = None  # gradients are already unscaled
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def train_step(run):
    """One optimizer step of run.step_model over --accum_steps micro-batches of run.data.train -> (mean loss,
    pre-clip grad norm, finite), all on the device: nothing here waits for the GPU.

    Each micro-batch loss is divided by accum_steps, so the gradients are those of the mean loss; DDP's
    no_sync skips the all-reduce on all but the last micro-batch. A step whose grad norm is not finite is
    skipped, weights, optimizer state and BatchNorm statistics alike. Under DDP the norm is of the
    all-reduced gradients, so every rank makes the same decision."""
    model, accum_steps = run.step_model, run.config.accum_steps
    buffers = list(model.buffers())  # BatchNorm statistics: updated by the forward passes, restored on a skip
    buffers_before = [buffer.clone() for buffer in buffers]
    loss_sum = torch.zeros((), device=run.device)
    for micro_step in range(accum_steps):
        images, masks = next(run.data.train)
        images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
        masks = masks.to(run.device, non_blocking=True)
        last = micro_step == accum_steps - 1
        with contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with run.autocast():
                loss = run.step_loss_fn(model(images), masks) / accum_steps
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.config.grad_clip or math.inf)
    finite = torch.isfinite(grad_norm)
    step_unless_nonfinite(run.optimizer, finite)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
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
    step_model: torch.nn.Module  # the model as the step calls it: compiled (--compile), DDP-wrapped (torchrun)
    step_loss_fn: torch.nn.Module
    started: float  # time.perf_counter() at which the run would have started had it never stopped
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
    run.progress.seconds = time.perf_counter() - run.started
    trained = {"trained_model": weights_dict(run.model, **run.weights_info())["model"],
               "average_updates": run.average.updates} if run.average else {}
    save_checkpoint(run.run_dir / CHECKPOINT_FILE, {**weights_dict(run.eval_model, **run.weights_info()), **trained},
                    run.optimizer, run.scheduler, run.scaler, run.config, run.progress, run.rank, run.config.world_size)


def start_run(config, checkpoint, rank, local_rank, started) -> Run:
    """Device, data (and the class statistics the config takes from it), model and optimizer, restored from the
    checkpoint when resuming."""
    device, amp_dtype, memory_format = setup_device(config, local_rank)
    layout, class_table = open_data(config, rank)
    train_masks = SegmentationDataset(config.data_root, "train", config.size, class_table, layout=layout)
    config = with_class_statistics(config, train_masks, rank)
    data = build_data(config, layout, class_table, rank, device, checkpoint["samples_seen"] if checkpoint else 0)
    model, optimizer, scheduler, scaler = build_training(config, class_table.num_classes, device, memory_format,
                                                         amp_dtype)
    loss_fn = CEDiceLoss(class_table.num_classes, IGNORE_INDEX, config.ce_weight, config.dice_weight,
                         config.class_weight_values, ohem_threshold=config.ohem_threshold,
                         lovasz_weight=config.lovasz_weight, logit_adjustment=config.logit_adjustment,
                         dice_per_image=config.dice_per_image).to(device)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    step_model = compiled(model, config)
    if config.world_size > 1:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(config, rank, device, amp_dtype, memory_format, data, model, optimizer, scheduler, scaler, loss_fn, average,
              step_model, compiled(loss_fn, config), started)
    seed_everything(config.seed, rank)
    if checkpoint:
        run.progress = restore(checkpoint, model, optimizer, scheduler, scaler, rank, config.world_size)
        run.started -= run.progress.seconds
        if average:
            average.load_state_dict(checkpoint)
    return run


def open_run_folder(run):
    """Rank 0: the run folder with config.json, and metrics.jsonl without what a kill left after the checkpoint."""
    Path(run.config.model_path).parent.mkdir(parents=True, exist_ok=True)  # fail now, not after training
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "snapshots").mkdir(exist_ok=True)
    remove_stale_temp_files(run.run_dir)  # what a kill left of an atomic write; the previous file is intact
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


def steps_within_budget(budget_s, elapsed_s, step, seconds_per_step) -> int:
    """The step count that ends the run within budget_s seconds: at `step`, elapsed_s into the run, with the steps
    to come as long as the timed ones (each carrying its share of the periodic evaluations)."""
    return step + max(0, math.floor((budget_s - elapsed_s) / seconds_per_step))


def fix_steps_to_budget(run, loop_started, first_step):
    """--time_budget: from this process's steps since first_step and its evaluation, the count that fits the budget,
    the same on every rank; kept in the config (config.json, and the checkpoint written right after), so a resume
    continues to it. The budget counts the time of every process of the run, setup included."""
    now = time.perf_counter()
    seconds_per_step = (now - loop_started) / (run.progress.step - first_step)
    steps = [steps_within_budget(run.config.time_budget * 60, now - run.started, run.progress.step, seconds_per_step)]
    if dist.is_initialized():
        dist.broadcast_object_list(steps)
    run.config = dataclasses.replace(run.config, training_iterations=steps[0])
    if run.rank == 0:
        run.config.save(run.run_dir / "config.json")
        tqdm.write(f"time budget {run.config.time_budget:g} min: {seconds_per_step:.2f} s a step with the evaluations, "
                   f"{(now - run.started) / 60:.1f} min so far: training for {steps[0]} steps")
    return steps[0]


def precision_line(run) -> str:
    """What --amp and --channels_last chose on this machine (config.json keeps the choices, such as "auto"): on a
    CPU, bf16 training steps where it computes bf16 natively, float32 where it does not (docs/precision.md)."""
    if run.device.type == "cpu":
        kind = torch.backends.cpu.get_cpu_capability()
    elif run.device.type == "cuda":
        kind = torch.cuda.get_device_name(run.device)
    else:
        kind = run.device.type
    layout = "channels_last" if run.memory_format == torch.channels_last else "contiguous"
    return (f"{run.device} ({kind}): training steps in {precision_name(run.amp_dtype)} (--amp {run.config.amp}), "
            f"{layout} (--channels_last {run.config.channels_last}); evaluations in "
            f"{precision_name(autocast_dtype('auto', run.device, training=False))}, as inference.py runs")


def train(config, checkpoint, rank=0, local_rank=0):
    """The training loop, in phases: build the run, then step, log, evaluate, checkpoint, until done."""
    run = start_run(config, checkpoint, rank, local_rank, started=time.perf_counter())  # --time_budget counts setup
    config = run.config
    if rank == 0:
        print(json.dumps(config.to_dict(), indent=2))
        print(precision_line(run))
        open_run_folder(run)
    metrics = MetricsLog(run.run_dir / "metrics.jsonl")
    logger = TrainLogger(run.device, run.progress.nonfinite_steps, config.global_batch, run.data.train_images,
                         run.data.train, config.world_size, config.max_nonfinite_steps)
    stop, total = StopRequest(), config.training_iterations or math.inf
    loop_started, first_step = time.perf_counter(), run.progress.step
    bar = tqdm(total=config.training_iterations, initial=run.progress.step, disable=rank != 0, unit="step",
               dynamic_ncols=True)
    try:
        while run.progress.step < total:
            lr = run.optimizer.param_groups[0]["lr"]
            loss, grad_norm, finite = train_step(run)
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
            fixing = total == math.inf and step % config.eval_interval == 0
            if fixing:
                bar.total = total = fix_steps_to_budget(run, loop_started, first_step)
                config = run.config
            if (step % config.save_model_interval == 0 or fixing) and step < total:  # a resume keeps a fixed count
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
        if checkpoint and config.training_iterations and checkpoint["step"] >= config.training_iterations:
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
