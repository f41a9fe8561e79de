"""Train the U-Net on Cityscapes, or on the built-in synthetic city when Cityscapes is absent.

    python training.py                              # Dataset/cityscapes if present, else the synthetic demo
    python training.py --data_root /data/cityscapes --batch_size 16 --accum_steps 1
    python training.py --resume auto                # continue the newest run in runs/, exactly
    torchrun --standalone --nproc_per_node=4 training.py   # DDP, one process per GPU

The run folder (--out_dir) gets config.json, metrics.jsonl, plots, prediction snapshots of fixed val
images at every evaluation, checkpoint.pt (the full training state, rewritten every
--save_model_interval steps, on Ctrl-C and at the end) and best_model.pth. --model_path gets the
weights with the best val mIoU over all evaluations, the final whole-split one included: with the
default --eval_iterations 0 every evaluation sees the whole val split, so they compare like for like.

Resuming continues bit for bit (same device, thread count and world size): data order and
augmentation are pure functions of (seed, epoch, index), and the checkpoint holds every RNG state.
--batch_size is per process: the global batch is batch_size * accum_steps * processes.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

import synthetic_city
from dataset import (IGNORE_INDEX, MEAN, STD, CityscapesDataset, DeviceCache, denormalize, has_cityscapes, one_line,
                     parse_size, save_prediction_grid)
from losses import CEDiceLoss
from lr_schedule import WarmupInverseSqrtLR
from metrics import ConfusionMatrix, finite_or_none, format_table, plot_confusion_matrix
from unet import UNet

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.pth"
SNAPSHOT_IMAGES = 4
INTERRUPTED_EXIT_CODE = 130
DATA_WAIT_HINT = 0.25  # share of the time spent waiting for batches above which training says so, once

# Real Cityscapes: the seed's run, the classic U-Net at 512x256 for ~10 epochs of the 2975 train images.
DEFAULTS = dict(
    dataset="auto", data_root="Dataset/cityscapes", classes=None, image_size="512x256", train_id_files=False,
    synthetic_train=300, synthetic_val=60,
    base_channels=64, depth=4, dropout=0.1, bilinear=False, sync_bn=False,
    ce_weight=1.0, dice_weight=1.0,
    batch_size=8, accum_steps=2, training_iterations=1860,  # 10 epochs * 2975 images / (8 * 2) per step
    base_lr=1e-3, min_lr=1e-5, warmup_steps=100, decay_factor=3e-3, weight_decay=1e-2, grad_clip=1.0,
    max_nonfinite_steps=10,
    scale_range=[0.5, 2.0], hflip_prob=0.5, color_jitter=0.2,
    eval_interval=200, eval_iterations=0, save_model_interval=200, log_interval=10,
    num_workers=min(8, os.cpu_count() or 1), data_cache="off", device="auto", amp="auto", channels_last="auto",
    compile=False, cudnn_benchmark=True, tf32=True, deterministic=False,
    seed=0, out_dir=None, model_path="unet_model.pth", resume=None,
)
# The demo trained when no Cityscapes is found: a small model on the synthetic city that reaches
# >= 0.70 val mIoU within 10 minutes on a 2-core CPU, data generation included (README, "Results").
# Small images and a depth-3 U-Net keep it in budget; a milder scale range suits 128x64 scenes,
# whose poles and signs are only a few pixels wide. Explicit flags win.
SYNTHETIC_DEMO = dict(
    data_root="Dataset/synthetic", image_size="128x64",
    base_channels=16, depth=3, scale_range=[0.75, 1.5],
    batch_size=8, accum_steps=1, training_iterations=1200,
    base_lr=3e-3, warmup_steps=50, decay_factor=2e-3,
    eval_interval=300, save_model_interval=300, num_workers=1,
)
# The synthetic city is data, not a training choice: the same scenes whatever --seed is.
SYNTHETIC_SEED = 0


def build_parser():
    """Every flag defaults to None so that resolve_config can tell given flags from defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(group, name, help, **kwargs):
        key = name[2:]
        if "default:" not in help:
            demo = SYNTHETIC_DEMO.get(key, DEFAULTS[key])
            demo_note = f"; synthetic demo: {demo}" if demo != DEFAULTS[key] else ""
            help = f"{help} (default: {DEFAULTS[key]}{demo_note})"
        group.add_argument(name, default=None, help=help, **kwargs)

    switch = dict(action=argparse.BooleanOptionalAction)
    data = parser.add_argument_group("data")
    flag(data, "--dataset", "cityscapes, synthetic, or auto: Cityscapes when found at --data_root, else the "
         "synthetic city", choices=["auto", "cityscapes", "synthetic"])
    flag(data, "--data_root", "dataset root in the official Cityscapes layout; given explicitly it must hold "
         "Cityscapes or a synthetic city (with --dataset synthetic, one is generated there if absent)")
    flag(data, "--classes", "Cityscapes class names to train, in train-id order; quote names with spaces, e.g. "
         "--classes road sidewalk \"traffic light\" (default: the 19 evaluation classes)", nargs="+")
    flag(data, "--image_size", "training and evaluation size WIDTHxHEIGHT")
    flag(data, "--train_id_files", "read the official pre-made _gtFine_labelTrainIds.png masks instead of mapping "
         "the _labelIds.png ones; default classes only", **switch)
    flag(data, "--synthetic_train", "train images to generate for the synthetic city", type=int)
    flag(data, "--synthetic_val", "val images to generate for the synthetic city", type=int)
    flag(data, "--scale_range", "augmentation: random scale range, then a random crop", type=float, nargs=2)
    flag(data, "--hflip_prob", "augmentation: horizontal flip probability", type=float)
    flag(data, "--color_jitter", "augmentation: brightness/contrast/saturation jitter", type=float)
    model = parser.add_argument_group("model and loss")
    flag(model, "--base_channels", "U-Net width of the first stage", type=int)
    flag(model, "--depth", "U-Net down-sampling stages", type=int)
    flag(model, "--dropout", "Dropout2d probability at the bottleneck", type=float)
    flag(model, "--bilinear", "bilinear upsampling instead of transposed convs", **switch)
    flag(model, "--sync_bn", "DDP on GPUs: BatchNorm statistics over all ranks' micro-batches", **switch)
    flag(model, "--ce_weight", "weight of the cross-entropy term", type=float)
    flag(model, "--dice_weight", "weight of the Dice term", type=float)
    optim = parser.add_argument_group("optimisation")
    flag(optim, "--batch_size", "images per micro-batch and process", type=int)
    flag(optim, "--accum_steps", "micro-batches per optimizer step (gradient accumulation)", type=int)
    flag(optim, "--training_iterations", "optimizer steps", type=int)
    flag(optim, "--base_lr", "peak learning rate, reached at the end of warmup", type=float)
    flag(optim, "--min_lr", "starting learning rate and floor of the decay", type=float)
    flag(optim, "--warmup_steps", "optimizer steps of quadratic warmup", type=int)
    flag(optim, "--decay_factor", "inverse-sqrt decay speed: the lr halves 3/decay_factor steps after the peak",
         type=float)
    flag(optim, "--weight_decay", "AdamW weight decay of conv weights", type=float)
    flag(optim, "--grad_clip", "clip gradients to this global norm, 0 = off", type=float)
    flag(optim, "--max_nonfinite_steps", "stop after this many consecutive steps with non-finite gradients, as "
         "a NaN or inf loss gives (each is skipped; checked at every log step)", type=int)
    evaluation = parser.add_argument_group("evaluation, logging and checkpoints")
    flag(evaluation, "--eval_interval", "evaluate every this many optimizer steps (and at the end)", type=int)
    flag(evaluation, "--eval_iterations", "val batches (per process) of a periodic evaluation, 0 = the whole val "
         "split; the final evaluation always uses the whole split", type=int)
    flag(evaluation, "--save_model_interval", "write the training checkpoint every this many steps", type=int)
    flag(evaluation, "--log_interval", "log train loss, lr, grad norm and img/s every this many steps", type=int)
    flag(evaluation, "--out_dir", "run folder (default: runs/<date>-<time>; when resuming: the checkpoint's folder)")
    flag(evaluation, "--model_path", "where the best weights go, in the format inference.py reads")
    flag(evaluation, "--resume", "continue from a training checkpoint: a path, or auto = <out_dir>/checkpoint.pt "
         "when --out_dir is given, else the newest runs/*/checkpoint.pt (a new run when there is none). Its "
         "config is reused; flags given now override it, e.g. a higher --training_iterations continues a finished "
         "run, which is otherwise left as it is (default: a new run)")
    system = parser.add_argument_group("system and speed")
    flag(system, "--num_workers", "DataLoader worker processes", type=int)
    flag(system, "--data_cache", "device: for prepared data that fits in device memory, every process keeps the whole "
         "train split there as uint8 tensors and augments batches there (same scale/crop/flip/jitter "
         "distributions as the loader, not the same pixels: no antialiasing, sub-pixel crops); the workers then "
         "only decode it once. Meant for GPUs; on the CPU it is no faster than loader workers",
         choices=["off", "device"])
    flag(system, "--device", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    flag(system, "--amp", "autocast dtype; auto = bf16 on GPUs that support it, fp16 with a GradScaler on "
         "others, off on CPU", choices=["auto", "bf16", "fp16", "off"])
    flag(system, "--channels_last", "NHWC memory format; auto = on for CUDA and AVX-512 CPUs, off on other CPUs "
         "(slower there)",
         choices=["auto", "on", "off"])
    flag(system, "--compile", "torch.compile model and loss for the training step (the first steps then take "
         "minutes); evaluation runs them eagerly", **switch)
    flag(system, "--cudnn_benchmark", "CUDA: let cuDNN pick the fastest conv algorithms", **switch)
    flag(system, "--tf32", "CUDA: TF32 tensor cores for float32 matmuls and convs", **switch)
    flag(system, "--deterministic", "deterministic algorithms only (slower on GPU)", **switch)
    flag(system, "--seed", "seed of weights, data order, augmentation and dropout", type=int)
    return parser


def find_resume_checkpoint(resume, out_dir):
    """The checkpoint --resume names, or None for a new run (see --help)."""
    if resume is None:
        return None
    if resume != "auto":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"{resume}: checkpoint not found (--resume)")
        return resume
    candidates = [Path(out_dir) / CHECKPOINT] if out_dir else sorted(Path("runs").glob(f"*/{CHECKPOINT}"),
                                                                     key=os.path.getmtime)
    found = [str(path) for path in candidates if path.is_file()]
    if not found:
        print("--resume auto: no checkpoint found, starting a new run")
    return found[-1] if found else None


def load_checkpoint_file(path):
    """torch.load with weights_only=True (nothing in the file can run code), every failure turned into
    one line naming the file; training's --resume and inference.py both read checkpoints through it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not a checkpoint (notes, an image, a truncated download) fails in whatever part
    # of torch.load meets it first: IndexError, KeyError, EOFError, RuntimeError, UnpicklingError, ...
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # the weights_only unpickler's own reason ("Unsupported operand 0"), not its generic advice;
        # else the error's first sentence, with its type when the message alone says nothing ("105")
        reason = next((line for line in lines if "Unsupported" in line), lines[0].split(". ")[0] if lines else "")
        if len(reason) < 12:
            reason = f"{type(exc).__name__}: {reason}".rstrip(": ")
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in reason:
            raise ValueError(f"refused to load checkpoint {path}: it holds objects other than tensors and "
                             f"plain containers, and unpickling them could run code ({reason})") from None
        problem = "is empty" if path.stat().st_size == 0 else f"is not a PyTorch checkpoint (torch.load: {reason})"
        raise ValueError(f"checkpoint {path} {problem}") from None


def read_training_checkpoint(path):
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint:
        raise ValueError(f"{path}: not a training checkpoint (--resume needs a run folder's {CHECKPOINT}, "
                         f"not the inference weights)")
    return checkpoint


def resolve_dataset(dataset, data_root):
    """(kind, root): an explicit --data_root or --dataset cityscapes must find its data, never falls back.
    A synthetic city has the Cityscapes layout too; auto tells it by its manifest and trains the demo on it."""
    if dataset == "auto" and data_root and synthetic_city.read_settings(data_root) is not None:
        return "synthetic", data_root
    if dataset in ("auto", "cityscapes"):
        root = data_root or DEFAULTS["data_root"]
        if has_cityscapes(root):
            return "cityscapes", root
        if dataset == "cityscapes" or data_root:
            raise FileNotFoundError(f"{root}: no Cityscapes here (needs leftImg8bit/ and gtFine/ with train and "
                                    f"val; see Dataset/readme.md)")
        print(f"No Cityscapes at {root}: training the demo model on the synthetic city "
              f"({SYNTHETIC_DEMO['data_root']}); see Dataset/readme.md for the real data.")
    return "synthetic", data_root or SYNTHETIC_DEMO["data_root"]


def resolve_config(args):
    """DEFAULTS, then SYNTHETIC_DEMO on the synthetic city (or the checkpoint's config when resuming),
    then every flag given explicitly. Returns (config, checkpoint or None)."""
    given = {key: value for key, value in vars(args).items() if value is not None}
    resume_path = find_resume_checkpoint(given.get("resume"), given.get("out_dir"))
    if resume_path:
        checkpoint = read_training_checkpoint(resume_path)
        made_with = checkpoint["config"].get("data_cache", DEFAULTS["data_cache"])
        if given.get("data_cache", made_with) != made_with:
            raise ValueError(f"--data_cache {given['data_cache']}: {resume_path} was trained with --data_cache "
                             f"{made_with}; the two pipelines draw different augmentations, so the resume would "
                             f"not be exact")
        config = {**DEFAULTS, **checkpoint["config"], "out_dir": str(Path(resume_path).parent), **given,
                  "resume": resume_path}
    else:
        checkpoint = None
        kind, root = resolve_dataset(given.get("dataset", "auto"), given.get("data_root"))
        config = {**DEFAULTS, **(SYNTHETIC_DEMO if kind == "synthetic" else {}), **given,
                  "dataset": kind, "data_root": root, "resume": None}
        config["out_dir"] = config["out_dir"] or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    parse_size(config["image_size"])
    low, high = config["scale_range"]
    rules = [  # (flag, valid, what it must be), stated positively so that NaN, false in any comparison, fails
        *((key, config[key] >= 1, ">= 1") for key in ("batch_size", "accum_steps", "training_iterations",
                                                      "eval_interval", "save_model_interval", "log_interval",
                                                      "base_channels", "depth", "max_nonfinite_steps")),
        # a negative --grad_clip would flip the gradients' sign
        *((key, config[key] >= 0, ">= 0") for key in ("grad_clip", "eval_iterations", "weight_decay", "color_jitter",
                                                      "num_workers")),
        ("dropout", 0 <= config["dropout"] < 1, "in [0, 1)"),
        ("hflip_prob", 0 <= config["hflip_prob"] <= 1, "in [0, 1]"),
        ("base_lr", config["base_lr"] > 0, "> 0"),
        ("min_lr", 0 <= config["min_lr"] <= config["base_lr"], f"in [0, --base_lr {config['base_lr']}]"),
        ("scale_range", 0 < low <= high, "LOW HIGH with 0 < LOW <= HIGH"),
    ]
    for key, valid, expected in rules:
        if not valid:
            raise ValueError(f"--{key} must be {expected}, got {config[key]}")
    return config, checkpoint


def derived_seed(*keys):
    """A well-mixed 64-bit seed from integer keys, e.g. (seed, epoch, index)."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


class GlobalBatchSampler(Sampler):
    """Endless stream of (index, sample seed), shuffled anew each epoch, a pure function of the seed.

    All ranks read one global stream; each optimizer step consumes batch_size * accum_steps *
    world_size items, and rank r takes the r-th contiguous block of them, so its micro-batch j holds
    exactly the images a single process with accum_steps * world_size would put in micro-batch
    r * accum_steps + j: the runs train to the same weights (BatchNorm included, its statistics are
    per micro-batch). `start` is the global position to resume from (steps done * global batch).
    The sample seed, derived from (seed, epoch, index), drives that image's augmentation.
    """

    def __init__(self, num_samples, seed, rank, world_size, rank_block, start=0):
        self.num_samples, self.seed, self.rank = num_samples, seed, rank
        self.world_size, self.rank_block, self.start = world_size, rank_block, start

    def __iter__(self):
        order_epoch, order = None, None
        position = self.start + self.rank * self.rank_block
        while True:
            for offset in range(self.rank_block):
                epoch, index = divmod(position + offset, self.num_samples)
                if epoch != order_epoch:
                    generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
                    order_epoch, order = epoch, torch.randperm(self.num_samples, generator=generator).tolist()
                yield order[index], derived_seed(self.seed, epoch, order[index])
            position += self.rank_block * self.world_size


class SeededSamples(Dataset):
    """dataset[(index, seed)]: the sample drawn under its own torch seed, so random crops, flips and
    jitter depend on (seed, epoch, index) only, not on workers or on the global RNG (left untouched)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class CachedBatches:
    """--data_cache device: stands in for the train DataLoader, batching the same (index, seed) stream from the
    cache: the same images in the same order as the loader would give, each augmented from its own seed (the
    same distributions as the loader's, not the same pixels)."""

    def __init__(self, cache, sampler, batch_size):
        self.dataset, self.sampler, self.batch_size = cache, sampler, batch_size

    def __iter__(self):
        keys = iter(self.sampler)
        while True:
            indices, seeds = zip(*itertools.islice(keys, self.batch_size))
            yield self.dataset.batch(indices, seeds)


class TimedBatches:
    """The training batches, adding up how long the loop waits for them (`waited`, seconds): as a share of
    the wall time (data_wait in metrics.jsonl) it says whether the input pipeline, not the model, sets the pace."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.waited += time.perf_counter() - start
        return batch


def ignore_sigint(worker_id):
    """Workers ignore Ctrl-C: the main process decides when to stop and must still get its batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_synthetic_city(root, num_train, num_val, size):
    """Generate the synthetic city at root, or finish an interrupted generation (a no-op when complete).
    A city made with other settings, e.g. by `dataset.py synth`, is the user's data: used as it is."""
    made_with = synthetic_city.read_settings(root)
    if made_with in (None, synthetic_city.settings_for(num_train, num_val, size, SYNTHETIC_SEED)):
        synthetic_city.generate(root, num_train, num_val, size=size, seed=SYNTHETIC_SEED)
    else:
        width, height = made_with["size"]
        print(f"{root}: using the synthetic city there as it is ({width}x{height}, {made_with['num_train']} train "
              f"and {made_with['num_val']} val images); --synthetic_train and --synthetic_val apply to new cities")


def build_data(config, rank, world_size, device, start_step):
    """Train loader (the seeded global stream from start_step on), this rank's val loader, snapshot images."""
    root, size = config["data_root"], parse_size(config["image_size"])
    if config["dataset"] == "synthetic":
        if rank == 0:
            prepare_synthetic_city(root, config["synthetic_train"], config["synthetic_val"], size)
        if world_size > 1:
            dist.barrier()
    train_set = CityscapesDataset(root, "train", size, config["classes"], augment=True,
                                  use_train_id_files=config["train_id_files"],
                                  scale_range=tuple(config["scale_range"]), hflip_prob=config["hflip_prob"],
                                  color_jitter=config["color_jitter"])
    val_set = CityscapesDataset(root, "val", size, config["classes"], use_train_id_files=config["train_id_files"])
    global_batch = config["batch_size"] * config["accum_steps"] * world_size
    sampler = GlobalBatchSampler(len(train_set), config["seed"], rank, world_size,
                                 config["batch_size"] * config["accum_steps"], start=start_step * global_batch)
    workers = config["num_workers"]
    loader_options = dict(batch_size=config["batch_size"], num_workers=workers, pin_memory=device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                          worker_init_fn=ignore_sigint,
                          # own generators: creating an iterator must not draw from the global RNG
                          generator=torch.Generator().manual_seed(config["seed"]))
    if config["data_cache"] == "device":
        width, height = size
        cache_bytes = len(train_set) * width * height * 4  # uint8 RGB image + uint8 mask per pixel
        if device.type == "cuda" and cache_bytes > torch.cuda.mem_get_info(device)[0] // 2:
            raise ValueError(f"--data_cache device: the train split needs {cache_bytes / 2**30:.1f} GiB, more than half "
                             f"of the {torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB free on {device}")
        if rank == 0:
            print(f"caching {len(train_set)} train images ({cache_bytes / 2**30:.2f} GiB) on {device}")
        cache = DeviceCache(train_set, device, tuple(config["scale_range"]), config["hflip_prob"],
                            config["color_jitter"], num_workers=workers)
        train_loader = CachedBatches(cache, sampler, config["batch_size"])
    else:
        train_loader = DataLoader(SeededSamples(train_set), sampler=sampler, **loader_options)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)), **loader_options)
    snapshot_ids = sorted(set(np.linspace(0, len(val_set) - 1, SNAPSHOT_IMAGES).round().astype(int).tolist()))
    snapshot = [torch.stack(tensors) for tensors in zip(*(val_set[i] for i in snapshot_ids))]
    return train_loader, val_loader, snapshot, train_set.class_table


def build_optimizer(model, config):
    """AdamW: Adam's per-parameter step sizes train a from-scratch U-Net robustly, and its weight decay is
    decoupled from the adaptive update (Loshchilov & Hutter), so it shrinks weights at the same rate
    whatever their gradient history. Only conv weights decay: decaying BatchNorm scales just fights the
    normalisation, and biases are too few to overfit. The fused implementation updates every parameter in
    one kernel, and it can skip a step on the device (see step_unless_nonfinite)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config["base_lr"], fused=True)


def resolve_device(name, local_rank):
    """--device auto -> cuda (this rank's GPU) when available, else cpu; selects the GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device available")
        torch.cuda.set_device(device)
    return device


def resolve_amp_dtype(amp, device):
    """--amp auto -> bf16 on GPUs with native bf16, fp16 (with a GradScaler) on older ones, off on CPU,
    where bf16 autocast is slower than float32 for convs."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def resolve_channels_last(choice, device):
    """--channels_last auto -> NHWC on CUDA (tensor-core convs want it) and on AVX-512 CPUs, where oneDNN's
    NHWC kernels trained the classic U-Net 1.11x and the demo 1.27x faster; NCHW on other CPUs: on an AVX2
    EPYC, NHWC trained the classic U-Net 1.37x slower (bench/README.md)."""
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def setup_device(config, local_rank, world_size):
    """Device, process group and backend flags -> (device, autocast dtype or None, memory format)."""
    device = resolve_device(config["device"], local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config["cudnn_benchmark"] and not config["deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config["tf32"]
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config["sync_bn"] and world_size > 1 and device.type != "cuda":
        raise ValueError("--sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
    return (device, resolve_amp_dtype(config["amp"], device),
            torch.channels_last if resolve_channels_last(config["channels_last"], device) else torch.contiguous_format)


def build_model(config, num_classes, device, memory_format, amp_dtype, world_size):
    """U-Net (same initial weights on every rank), AdamW, LR schedule and GradScaler (fp16 only)."""
    torch.manual_seed(config["seed"])
    model = UNet(3, num_classes, config["base_channels"], config["depth"], config["dropout"], config["bilinear"])
    if config["sync_bn"] and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, config)
    scheduler = WarmupInverseSqrtLR(optimizer, config["warmup_steps"], config["decay_factor"], config["min_lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return model, optimizer, scheduler, scaler


def for_training_step(module, config):
    """The module as the training step calls it: torch.compile'd under --compile. Model and loss are both
    compiled: the loss's float32 softmax, one-hot and sums over every pixel and class are memory-bound
    passes that the compiler fuses (on a 2-core CPU its forward and backward at 2 x 512x256 ran 2-3x
    faster). Evaluation calls the eager modules: its other grad mode and batch sizes would make
    torch.compile compile everything again, minutes on a GPU, for a small share of the work."""
    return torch.compile(module) if config["compile"] else module


def step_unless_nonfinite(optimizer, finite):
    """optimizer.step(), made a no-op on the device when the bool tensor `finite` is False, so skipping a
    bad step needs no host sync. The fused AdamW reads a `found_inf` tensor (the contract torch.amp.GradScaler
    uses with fused optimizers) and, where it is 1, leaves weights, moments and step count untouched."""
    optimizer.found_inf = (~finite).float()
    optimizer.grad_scale = None  # gradients are already unscaled
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def train_step(model, batches, accum_steps, loss_fn, optimizer, scaler, autocast, grad_clip, device,
               memory_format=torch.contiguous_format):
    """One optimizer step over `accum_steps` micro-batches -> (mean loss, pre-clip grad norm, finite), all
    tensors on the device: nothing here waits for the GPU, so the host can queue the next step meanwhile.

    Each micro-batch loss is divided by accum_steps, so the summed gradients are those of the mean
    loss; DDP's no_sync skips the gradient all-reduce on all but the last micro-batch. A step whose grad
    norm is not finite (a NaN or inf loss makes it so, as does an fp16 overflow) is skipped, weights,
    optimizer state and BatchNorm statistics alike, so non-finite values never reach the model; `finite`
    (bool) says whether it was taken. Under DDP the norm is of the all-reduced gradients, so every rank
    makes the same decision (a loss, being per rank, could not decide)."""
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


@torch.inference_mode()
def evaluate(model, loader, loss_fn, num_classes, device, autocast, memory_format, max_batches=0):
    """Val loss and official metrics over `max_batches` batches (0 = all) of each rank's shard, summed
    over ranks. Everything stays on the device until the final compute()."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, IGNORE_INDEX, device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images
    for batch_index, (images, masks) in enumerate(loader):
        if max_batches and batch_index >= max_batches:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        totals[0] += loss_fn(logits, masks).double() * len(images)
        totals[1] += len(images)
        matrix.update(logits.argmax(1), masks)
    model.train()
    matrix.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item(), matrix.compute(), matrix.matrix.cpu()


@torch.inference_mode()
def save_snapshot(model, snapshot, class_table, path, device, autocast, memory_format):
    """image | ground truth | prediction of the fixed val images, as the seed's pred1..6 but with images."""
    images, masks = snapshot
    model.eval()
    with autocast():
        predictions = model(images.to(device, memory_format=memory_format)).argmax(1).cpu()
    model.train()
    save_prediction_grid(path, [denormalize(image) for image in images], list(masks), list(predictions),
                         class_table)


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a kill at any instant leaves the previous file intact."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def inference_checkpoint(model, config, class_names):
    """The contract's --model_path format; refuses to package non-finite weights."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite weights ({', '.join(bad[:3])})")
    return {"model": state, "model_config": model.config, "class_names": list(class_names),
            "image_size": list(parse_size(config["image_size"])), "mean": list(MEAN), "std": list(STD)}


def rng_state():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, scaler, config, class_names, progress, rank, world_size):
    """Full training state; called on every rank (it gathers each rank's RNG state), written by rank 0."""
    states = [rng_state()]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
    if rank == 0:
        atomic_save({**inference_checkpoint(model, config, class_names), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "config": config,
                     "rng": states, **progress}, path)


def load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, rank, world_size):
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # CPU checkpoints of versions before the sync-free loop say fused=None
        group.update(fused=True, foreach=None)
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    if len(checkpoint["rng"]) == world_size:
        set_rng_state(checkpoint["rng"][rank])
    else:
        print(f"resuming {len(checkpoint['rng'])} ranks' state on {world_size}: dropout draws will differ")


def log_record(run_dir, record):
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")


def read_records(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def eval_record(step, val_loss, results, class_names, val_pixels, final=False):
    scores = {key: finite_or_none(results[key]) for key in ("miou", "fwiou", "pixel_acc", "mean_acc")}
    return {"step": step, "val_loss": finite_or_none(val_loss), **scores,
            "per_class_iou": {name: finite_or_none(iou) for name, iou in zip(class_names, results["iou"].tolist())},
            "val_pixels": val_pixels, "final": final}


def plot_run(run_dir, class_names, confusion):
    """training_curves.png (losses, val mIoU, lr), per_class_iou.png (final eval), confusion_matrix.png.
    Every point gets a marker, so a run with a single log point still shows it."""
    records = read_records(run_dir)
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "miou" in r]
    figure = Figure(figsize=(15, 4), layout="constrained")
    loss_ax, miou_ax, lr_ax = figure.subplots(1, 3)
    loss_ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], ".-", label="train")
    loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    miou_ax.plot([r["step"] for r in evals], [r["miou"] for r in evals], "o-")
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], ".-")
    for axis, title in ((loss_ax, "loss"), (miou_ax, "val mIoU"), (lr_ax, "learning rate")):
        axis.set(xlabel="optimizer step", title=title)
    loss_ax.legend()
    figure.savefig(run_dir / "training_curves.png", dpi=100)
    ious = [evals[-1]["per_class_iou"][name] for name in class_names]
    figure = Figure(figsize=(8, 1 + 0.3 * len(class_names)), layout="constrained")
    axis = figure.subplots()
    bars = axis.barh(class_names, [0 if iou is None else iou for iou in ious])
    for bar, iou in zip(bars, ious):
        if iou is None:  # no pixel of the class in ground truth or prediction: undefined, not 0
            bar.set(width=1, facecolor="none", edgecolor="grey", hatch="//")
    axis.bar_label(bars, ["n/a" if iou is None else "" for iou in ious], label_type="center")
    axis.set(xlim=(0, 1), xlabel="IoU", title=f"per-class IoU at step {evals[-1]['step']}")
    axis.invert_yaxis()
    figure.savefig(run_dir / "per_class_iou.png", dpi=100)
    plot_confusion_matrix(confusion, class_names, run_dir / "confusion_matrix.png")


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


def train(config, checkpoint, rank, world_size, local_rank):
    device, amp_dtype, memory_format = setup_device(config, local_rank, world_size)
    run_dir = Path(config["out_dir"])
    progress = {"step": 0, "samples_seen": 0, "epoch": 0, "best_miou": -1.0, "best_step": None,
                "nonfinite_steps": 0}
    if checkpoint:
        progress = {key: checkpoint[key] for key in progress}
    train_loader, val_loader, snapshot, class_table = build_data(config, rank, world_size, device, progress["step"])
    raw_model, optimizer, scheduler, scaler = build_model(config, class_table.num_classes, device, memory_format,
                                                          amp_dtype, world_size)
    random.seed(config["seed"] + rank)  # dropout differs per rank
    np.random.seed(config["seed"] + rank)
    torch.manual_seed(config["seed"] + rank)
    if checkpoint:
        load_checkpoint(checkpoint, raw_model, optimizer, scheduler, scaler, rank, world_size)
    train_model = for_training_step(raw_model, config)
    if world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = CEDiceLoss(class_table.num_classes, IGNORE_INDEX, config["ce_weight"], config["dice_weight"]).to(device)
    train_loss_fn = for_training_step(loss_fn, config)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def run_eval(step, max_batches, final=False):
        """Evaluate, log, snapshot and keep the best weights; returns (results, confusion matrix)."""
        val_loss, results, confusion = evaluate(raw_model, val_loader, loss_fn, class_table.num_classes, device,
                                                autocast, memory_format, max_batches)
        if rank == 0:
            record = eval_record(step, val_loss, results, class_table.names, int(confusion.sum()), final)
            log_record(run_dir, record)
            save_snapshot(raw_model, snapshot, class_table, run_dir / "snapshots" / f"step_{step:06d}.png", device,
                          autocast, memory_format)
            # the first evaluation always saves (its mIoU is NaN when no val pixel is labelled); any later one
            # replaces an undefined best
            best_miou = progress["best_miou"]
            if progress["best_step"] is None or results["miou"] > best_miou or math.isnan(best_miou):
                progress.update(best_miou=results["miou"], best_step=step)
                atomic_save(inference_checkpoint(raw_model, config, class_table.names), run_dir / BEST_MODEL)
            tqdm.write(f"step {step}: val loss {val_loss:.4f}, mIoU {results['miou']:.4f}, "
                       f"pixel acc {results['pixel_acc']:.4f}")
        return results, confusion

    def checkpoint_now(step):
        global_batch = config["batch_size"] * config["accum_steps"] * world_size
        progress.update(step=step, samples_seen=step * global_batch, nonfinite_steps=int(nonfinite_total.item()),
                        epoch=step * global_batch // len(train_loader.dataset))
        save_checkpoint(run_dir / CHECKPOINT, raw_model, optimizer, scheduler, scaler, config, class_table.names,
                        progress, rank, world_size)

    if rank == 0:
        Path(config["model_path"]).parent.mkdir(parents=True, exist_ok=True)  # fail now, not after training
        print(json.dumps(config, indent=2))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "snapshots").mkdir(exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        kept = [r for r in read_records(run_dir) if r["step"] <= progress["step"]]  # drop what a kill left after
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    total_steps, step = config["training_iterations"], progress["step"]
    images_per_step = config["batch_size"] * config["accum_steps"] * world_size
    batches = TimedBatches(iter(train_loader))
    stop = StopRequest()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    # per-step tallies stay on the device, read back once per log interval: the loop never waits for the GPU
    log_loss, log_steps, nonfinite_run, longest_nonfinite_run = (torch.zeros((), device=device) for _ in range(4))
    nonfinite_total = torch.tensor(float(progress["nonfinite_steps"]), device=device)
    logged_nonfinite, interval_steps, log_start = progress["nonfinite_steps"], 0, time.perf_counter()
    intervals_logged, data_wait_hinted = 0, False
    try:
        while step < total_steps:
            lr = optimizer.param_groups[0]["lr"]
            loss, grad_norm, finite = train_step(train_model, batches, config["accum_steps"], train_loss_fn, optimizer,
                                                 scaler, autocast, config["grad_clip"], device, memory_format)
            scheduler.step()
            step += 1
            interval_steps += 1
            bar.update()
            log_loss += torch.where(finite, loss, 0.0)
            log_steps += finite
            nonfinite_total += ~finite
            nonfinite_run = torch.where(finite, 0.0, nonfinite_run + 1)
            longest_nonfinite_run = torch.maximum(longest_nonfinite_run, nonfinite_run)
            log_now = step % config["log_interval"] == 0 or step == total_steps
            if log_now:
                if world_size > 1:
                    dist.all_reduce(log_loss)
                elapsed = time.perf_counter() - log_start
                loss_sum, finite_steps, nonfinite_steps, longest_run, norm = torch.stack(
                    [log_loss, log_steps, nonfinite_total, longest_nonfinite_run, grad_norm]).tolist()
                skipped, logged_nonfinite = int(nonfinite_steps) - logged_nonfinite, int(nonfinite_steps)
                if skipped and rank == 0:
                    tqdm.write(f"step {step}: {skipped} step(s) since the last log had non-finite gradients and "
                               "were skipped")
                if longest_run >= config["max_nonfinite_steps"]:
                    sys.exit(f"error: {int(longest_run)} consecutive non-finite steps (at step {step}); "
                             f"lower --base_lr or --grad_clip, or try --amp off")
                train_loss = loss_sum / (finite_steps * world_size) if finite_steps else None
                record = {"step": step, "epoch": step * images_per_step // len(train_loader.dataset),
                          "train_loss": train_loss, "lr": lr, "grad_norm": norm,
                          "img_per_s": interval_steps * images_per_step / elapsed,
                          "nonfinite_steps": logged_nonfinite, "data_wait": batches.waited / elapsed}
                intervals_logged += 1
                # the first interval also holds the loader workers' start-up
                if record["data_wait"] > DATA_WAIT_HINT and intervals_logged > 1 and not data_wait_hinted and rank == 0:
                    data_wait_hinted = True
                    tqdm.write(f"step {step}: {record['data_wait']:.0%} of the time went to waiting for batches: the "
                               "input pipeline sets the pace; more --num_workers, data prepared at the training size "
                               "(python dataset.py prepare) or --data_cache device would speed training up")
                if rank == 0:
                    log_record(run_dir, record)
                    bar.set_postfix(loss=f"{train_loss or math.nan:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{record['img_per_s']:.1f}")
                for tally in (log_loss, log_steps, longest_nonfinite_run):
                    tally.zero_()
                interval_steps, log_start, batches.waited = 0, time.perf_counter(), 0.0
            if step % config["eval_interval"] == 0 and step < total_steps:
                run_eval(step, config["eval_iterations"])
            if step % config["save_model_interval"] == 0 and step < total_steps:
                checkpoint_now(step)
            # a checkpoint at the last step would read as a finished run (see main): the last step just finishes.
            # Under DDP, agreeing to stop is a collective that waits for the GPU, so ranks agree at log steps.
            if step < total_steps and (world_size == 1 or log_now) and stop.agreed(device):
                checkpoint_now(step)
                if rank == 0:
                    print(f"interrupted at step {step}; checkpoint saved to {run_dir / CHECKPOINT}; continue with "
                          f"--resume {run_dir / CHECKPOINT}")
                sys.exit(INTERRUPTED_EXIT_CODE)
    except torch.OutOfMemoryError:
        batch_size, accum_steps = config["batch_size"], config["accum_steps"]
        sys.exit(f"error: out of GPU memory at --batch_size {batch_size}; try --batch_size {max(batch_size // 2, 1)} "
                 f"--accum_steps {accum_steps * 2} (same images per step)")
    finally:
        stop.restore()
        bar.close()

    results, confusion = run_eval(step, 0, final=True)
    checkpoint_now(step)
    if rank == 0:
        atomic_save(torch.load(run_dir / BEST_MODEL, weights_only=True), config["model_path"])
        plot_run(run_dir, class_table.names, confusion)
        print(format_table(results, class_table.names))
        print(f"final weights: val mIoU {results['miou']:.4f}; best weights (step {progress['best_step']}, "
              f"val mIoU {progress['best_miou']:.4f}) saved to {config['model_path']}; run folder {run_dir}")


def error_line(error):
    """`file: problem` for the user; an OSError's own text puts the file last ("[Errno 17] File exists: 'x'")."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return one_line(error)


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints; errors still reach stderr
    try:
        config, checkpoint = resolve_config(args)
        if checkpoint and checkpoint["step"] >= config["training_iterations"]:
            print(f"{config['resume']}: already complete ({checkpoint['step']} steps); raise --training_iterations "
                  f"to train further")
            return
        train(config, checkpoint, rank, world_size, int(os.environ.get("LOCAL_RANK", 0)))
    except (ValueError, OSError) as error:  # bad data, flags or paths, also when a DataLoader worker hit it
        print(f"error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:
        sys.exit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
