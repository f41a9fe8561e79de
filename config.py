"""Training configuration: one typed dataclass, the named presets, and how a command line resolves them.

Resolution, later wins: TrainConfig's defaults (the original project's Cityscapes run) < the preset (`--preset NAME`,
or the one the data calls for) < the checkpoint's config when resuming < every flag given explicitly.
"""
import argparse
import dataclasses
import json
import math
import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import runtime
from checkpoint import find_resume_checkpoint, read_checkpoint
from dataset import detect_layout, has_cityscapes, no_dataset_error
from losses import median_frequency_weights
from runtime import DEFAULT_IMAGE_SIZE, UserError, atomic_write, parse_size
from synthetic_city import read_settings as synthetic_city_settings
from unet import INPUT_NORMS, WEIGHTS_FILE

DATASETS = ("auto", "cityscapes", "camvid", "folder", "synthetic")
COMPUTED_CLASS_WEIGHTS = ("auto", "sqrt")  # --class_weights computed from the train masks


def option(default, help, group, **argparse_kwargs):
    """A config field with its command-line help; argparse_kwargs go to add_argument (type, choices, ...)."""
    return field(default=default, metadata=dict(help=help, group=group, **argparse_kwargs))


SWITCH = dict(action=argparse.BooleanOptionalAction)


@dataclass
class TrainConfig:
    """Every setting of a training run. Field defaults are the original project's run on Cityscapes: the classic
    U-Net at 512x256 for ~10 epochs of the 2975 train images (1860 steps of 8 x 2 images)."""

    preset: str = option("cityscapes", "named settings to start from (see the list below); default: the one the "
                         "data calls for", "data")
    dataset: str = option("auto", "layout of --data_root: cityscapes, camvid, folder (your own data), synthetic, or "
                          "auto (recognised from its folders)", "data", choices=DATASETS)
    data_root: str = option("Dataset/cityscapes", "dataset folder; given explicitly it must hold data (with "
                            "--dataset synthetic, a city is generated there if absent)", "data")
    classes: tuple | None = option(None, "class names to train, in index order; quote names with spaces, e.g. "
                                   "--classes road sidewalk \"traffic light\" (default: the dataset's classes, for "
                                   "Cityscapes its 19 evaluation classes)", "data", nargs="+")
    image_size: str = option("{}x{}".format(*DEFAULT_IMAGE_SIZE), "size WIDTHxHEIGHT photos are resized to, for training, evaluation and "
                             "inference; evaluation scores at the labels' own size", "data")
    crop_size: str | None = option(None, "augmentation: train on random crops WIDTHxHEIGHT of the scaled image, "
                                   "so that a larger --image_size shows finer detail at the crop's cost per step; "
                                   "evaluation and inference still run the whole image at --image_size (default: "
                                   "--image_size)", "data")
    train_id_files: bool = option(False, "Cityscapes: read the official _gtFine_labelTrainIds.png masks instead of "
                                  "mapping the _labelIds.png ones; default classes only", "data", **SWITCH)
    synthetic_train: int = option(300, "train images to generate for the synthetic city", "data", type=int)
    synthetic_val: int = option(60, "val images to generate for the synthetic city", "data", type=int)
    scale_range: tuple = option((0.5, 2.0), "augmentation: random scale range, then a random crop", "data",
                                type=float, nargs=2)
    hflip_prob: float = option(0.5, "augmentation: horizontal flip probability", "data", type=float)
    color_jitter: float = option(0.2, "augmentation: brightness/contrast/saturation jitter", "data", type=float)
    copy_paste: float = option(0.0, "augmentation: probability that a train photo gets the --paste_classes pixels of "
                               "a random train photo (mirrored half the time) pasted in where they lie, so that those "
                               "objects are seen in new surroundings", "data", type=float)
    paste_classes: tuple | None = option(None, "class names --copy_paste pastes (default: the rare classes, those "
                                         "below the median class frequency, found once from the train masks); the "
                                         "classes used are stored in config.json; needs --copy_paste > 0", "data",
                                         nargs="+")

    base_channels: int = option(64, "U-Net width of the first stage", "model and loss", type=int)
    depth: int = option(4, "U-Net down-sampling stages", "model and loss", type=int)
    dropout: float = option(0.1, "Dropout2d probability at the bottleneck", "model and loss", type=float)
    bilinear: bool = option(False, "bilinear upsampling instead of transposed convs", "model and loss", **SWITCH)
    input_norm: str = option("dataset", "input normalisation: dataset = by the dataset's mean and std; photo = that, "
                             "then each photo standardised by its own mean and std, inside the model (so inference "
                             "and the ONNX export do it too): blind to a photo's exposure and contrast",
                             "model and loss", choices=INPUT_NORMS)
    sync_bn: bool = option(False, "DDP on GPUs: BatchNorm statistics over all ranks' micro-batches", "model and loss",
                           **SWITCH)
    class_weights: str = option("none", "per-class weights of the CE term (the Dice term already gives every class "
                                "the same say): none, auto = median-frequency balancing computed once from the train "
                                "masks (rare classes weigh more), sqrt = the square root of those (milder: rare "
                                "classes weigh less), or a file with one number per class; the weights "
                                "used are stored in config.json and the checkpoint", "model and loss")
    logit_adjustment: float = option(0.0, "remove this fraction of the class weights' bias towards rare classes from "
                                     "the trained model's predictions (Menon et al.'s logit adjustment): training "
                                     "is unchanged, the saved model's logits are the weighted model's minus this "
                                     "times log(class weight); 0 = keep the bias, 1 = remove it all; needs "
                                     "--class_weights", "model and loss", type=float)
    ce_weight: float = option(1.0, "weight of the cross-entropy term", "model and loss", type=float)
    dice_weight: float = option(1.0, "weight of the Dice term", "model and loss", type=float)
    dice_per_image: bool = option(False, "Dice per image and class, averaged over the (image, class) pairs, instead "
                                  "of per class over the whole batch: one photo's thin poles weigh as much as "
                                  "another's near ones", "model and loss", **SWITCH)
    lovasz_weight: float = option(0.0, "weight of the Lovasz-softmax term, a surrogate of 1 - IoU over the batch "
                                  "(Berman et al. 2018); it sorts every pixel for every class, so a step takes "
                                  "longer; 0 = off", "model and loss", type=float)
    ohem_threshold: float = option(0.0, "online hard example mining: the CE term averages only over the pixels whose "
                                   "predicted probability of their own class is at most this (mmsegmentation uses "
                                   "0.7), and at least the hardest tenth of the batch (the val loss too); 0 = every "
                                   "pixel", "model and loss", type=float)

    batch_size: int = option(8, "images per micro-batch and process", "optimisation", type=int)
    accum_steps: int = option(2, "micro-batches per optimizer step (gradient accumulation)", "optimisation", type=int)
    training_iterations: int | None = option(1860, "optimizer steps; with --time_budget, the run fixes them itself",
                                             "optimisation", type=int)
    time_budget: float = option(0.0, "minutes the whole run should take, setup and evaluations included: the run "
                                "times its first --eval_interval steps and evaluation, then fixes --training_iterations "
                                "to the steps that fit, prints it and keeps it in config.json and the checkpoint (so "
                                "--resume continues to it); 0 = train --training_iterations steps", "optimisation", type=float)
    base_lr: float = option(1e-3, "peak learning rate, reached at the end of warmup", "optimisation", type=float)
    min_lr: float = option(1e-5, "starting learning rate and floor of the decay", "optimisation", type=float)
    warmup_steps: int = option(100, "optimizer steps of quadratic warmup", "optimisation", type=int)
    decay_factor: float = option(3e-3, "inverse-sqrt decay speed: the lr halves 3/decay_factor steps after the peak",
                                 "optimisation", type=float)
    weight_decay: float = option(1e-2, "AdamW weight decay of conv weights", "optimisation", type=float)
    grad_clip: float = option(1.0, "clip gradients to this global norm, 0 = off", "optimisation", type=float)
    ema_decay: float = option(0.0, "exponential moving average of the weights, evaluated and saved instead of the raw "
                              "ones, with this decay per step (e.g. 0.999) once the ramp (1 + n) / (10 + n) of step n "
                              "reaches it; 0 = off", "optimisation", type=float)
    max_nonfinite_steps: int = option(10, "stop after this many consecutive steps with non-finite gradients, as a "
                                      "NaN or inf loss gives (each is skipped; checked at every log step)",
                                      "optimisation", type=int)

    eval_interval: int = option(200, "evaluate every this many optimizer steps (and at the end)", "evaluation, logging "
                                "and checkpoints", type=int)
    eval_iterations: int = option(0, "val batches (per process) of a periodic evaluation, 0 = the whole val split; "
                                  "the final evaluation always uses the whole split", "evaluation, logging and "
                                  "checkpoints", type=int)
    save_model_interval: int = option(200, "write the training checkpoint every this many steps", "evaluation, "
                                      "logging and checkpoints", type=int)
    log_interval: int = option(10, "log train loss, lr, grad norm and img/s every this many steps", "evaluation, "
                               "logging and checkpoints", type=int)
    out_dir: str | None = option(None, "run folder (default: runs/<date>-<time>; when resuming: the checkpoint's "
                                 "folder)", "evaluation, logging and checkpoints")
    model_path: str = option(WEIGHTS_FILE, "where the best weights go, in the format inference.py reads",
                             "evaluation, logging and checkpoints")
    resume: str | None = option(None, "continue from a training checkpoint: a path, or auto = <out_dir>/checkpoint.pt "
                                "when --out_dir is given, else the newest runs/*/checkpoint.pt (a new run when there "
                                "is none). Its config is reused and flags given now override it, e.g. a higher "
                                "--training_iterations continues a finished run (default: a new run)",
                                "evaluation, logging and checkpoints")

    num_workers: int = option(min(8, os.cpu_count() or 1), "DataLoader worker processes", "system and speed",
                              type=int)
    data_cache: str = option("off", "device: keep the whole train split on the device as uint8 tensors and augment "
                             "batches there (same distributions as the loader, not the same pixels); for prepared "
                             "data that fits in device memory", "system and speed", choices=["off", "device"])
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...", "system and speed")
    amp: str = option("auto", "autocast dtype of the training steps; auto = bf16 on GPUs and CPUs with native bf16, "
                      "fp16 with a GradScaler on older GPUs, off on other CPUs. The periodic evaluation always runs "
                      "in inference.py's default precision on this device (float32 on CPUs), so its scores are "
                      "those of inference.py --evaluate", "system and speed",
                      choices=["auto", "bf16", "fp16", "off"])
    channels_last: str = option("auto", "NHWC memory format; auto = on for CUDA and AVX-512 CPUs, off on other CPUs",
                                "system and speed", choices=["auto", "on", "off"])
    compile: bool = option(False, "torch.compile model and loss for the training step (the first steps then take "
                           "minutes); evaluation runs them eagerly", "system and speed", **SWITCH)
    cudnn_benchmark: bool = option(True, "CUDA: let cuDNN pick the fastest conv algorithms", "system and speed",
                                   **SWITCH)
    tf32: bool = option(True, "CUDA: TF32 tensor cores for float32 matmuls and convs", "system and speed", **SWITCH)
    deterministic: bool = option(False, "deterministic algorithms only (slower on GPU)", "system and speed", **SWITCH)
    dist_timeout: int = option(600, "DDP: seconds a rank waits for the others (the start-up rendezvous, any collective) "
                               "before failing, so that torchrun can restart the round", "system and speed", type=int)
    seed: int = option(0, "seed of weights, data order, augmentation and dropout", "system and speed", type=int)
    world_size: int = 1  # processes (torchrun sets it); not a flag
    class_weight_values: tuple | None = None  # the weights --class_weights resolved to, once; not a flag

    def __post_init__(self):
        self.scale_range = tuple(self.scale_range)
        self.classes = None if self.classes is None else tuple(self.classes)
        if self.class_weight_values is not None:
            self.class_weight_values = tuple(self.class_weight_values)
        if self.paste_classes is not None:
            self.paste_classes = tuple(self.paste_classes)
        self.validate()

    @property
    def size(self) -> tuple[int, int]:
        """image_size as (width, height)."""
        return parse_size(self.image_size)

    @property
    def crop(self) -> tuple[int, int]:
        """The training crop as (width, height): crop_size, or the whole image_size."""
        return parse_size(self.crop_size) if self.crop_size else self.size

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.accum_steps * self.world_size

    def validate(self):
        """Raise a UserError naming the first flag whose value cannot work."""
        for flag in ("image_size", "crop_size"):
            size = getattr(self, flag)
            try:
                if size is not None:
                    parse_size(size)
            except ValueError as error:
                raise UserError(f"--{flag}: {error}") from None
        if self.class_weights not in ("none", *COMPUTED_CLASS_WEIGHTS) and self.class_weight_values is None \
                and not Path(self.class_weights).is_file():
            raise UserError(f"--class_weights {self.class_weights}: expected none, auto, sqrt, or a file of weights")
        low, high = self.scale_range
        rules = [  # (flag, valid, what it must be), stated positively so that NaN, false in any comparison, fails
            *((key, getattr(self, key) >= 1, ">= 1") for key in (
                "batch_size", "accum_steps", "eval_interval", "save_model_interval", "log_interval",
                "base_channels", "depth", "max_nonfinite_steps", "dist_timeout")),
            # None: --time_budget fixes the count after the first evaluation
            ("training_iterations", self.training_iterations >= 1 if self.training_iterations is not None
             else self.time_budget > 0, ">= 1"),
            ("time_budget", self.time_budget >= 0, ">= 0"),
            # a negative --grad_clip would flip the gradients' sign
            *((key, getattr(self, key) >= 0, ">= 0") for key in (
                "grad_clip", "eval_iterations", "weight_decay", "color_jitter", "num_workers", "warmup_steps",
                "decay_factor", "lovasz_weight")),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("hflip_prob", 0 <= self.hflip_prob <= 1, "in [0, 1]"),
            ("copy_paste", 0 <= self.copy_paste <= 1, "in [0, 1]"),
            ("ohem_threshold", 0 <= self.ohem_threshold <= 1, "in [0, 1]"),
            ("logit_adjustment", 0 <= self.logit_adjustment <= 1, "in [0, 1]"),
            ("base_lr", self.base_lr > 0, "> 0"),
            ("min_lr", 0 <= self.min_lr <= self.base_lr, f"in [0, --base_lr {self.base_lr}]"),
            ("scale_range", 0 < low <= high, "LOW HIGH with 0 < LOW <= HIGH"),
        ]
        if self.paste_classes and self.copy_paste == 0:
            raise UserError(f"--paste_classes {' '.join(map(str, self.paste_classes))}: pasting is off; "
                            "give --copy_paste P (0 < P <= 1) too")
        for key, valid, expected in rules:
            if not valid:
                value = list(getattr(self, key)) if key == "scale_range" else getattr(self, key)
                raise UserError(f"--{key} must be {expected}, got {value}")
        (crop_width, crop_height), (width, height) = self.crop, self.size
        if crop_width > round(width * high) or crop_height > round(height * high):
            raise UserError(f"--crop_size {self.crop_size} is larger than --image_size {self.image_size} at the "
                            f"largest --scale_range {high}: every crop would be partly padding")
        if self.logit_adjustment and self.class_weights == "none":
            raise UserError(f"--logit_adjustment {self.logit_adjustment} takes out part of the class weights' bias, "
                            f"but --class_weights is none; give --class_weights auto, sqrt or a file, or drop it")

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def save(self, path):
        atomic_write(path, lambda file: file.write((json.dumps(self.to_dict(), indent=2) + "\n").encode()))


ON_GPU, ON_BF16_CPU = "on a GPU", "on a CPU with native bf16"  # the machines a preset may change settings on


@dataclass(frozen=True)
class Preset:
    description: str
    settings: dict
    on_gpu: dict = field(default_factory=dict)  # what changes when a new run's device is a GPU
    on_bf16_cpu: dict = field(default_factory=dict)  # what changes when a new run trains in bf16 on a CPU natively

    def machine_changes(self) -> list[tuple[str, dict]]:
        """[(where, what changes there)] for the machines the preset changes settings on."""
        return [(where, changes) for where, changes in ((ON_GPU, self.on_gpu), (ON_BF16_CPU, self.on_bf16_cpu))
                if changes]


SYNTHETIC_ROOT = "Dataset/synthetic"
PRESETS = {
    "cityscapes": Preset("the original project's run on Cityscapes: the classic U-Net at 512x256, ~10 epochs of the "
                         "train split",
                         dict(dataset="cityscapes", data_root="Dataset/cityscapes")),
    # A demo of minutes on a CPU: small images and a depth-3 U-Net; a milder scale range suits 128x64 scenes,
    # whose poles and signs are only a few pixels wide (docs/synthetic.md).
    "synthetic": Preset("the demo on the generated synthetic city: a small U-Net at 128x64, minutes on a CPU",
                        dict(dataset="synthetic", data_root=SYNTHETIC_ROOT, image_size="128x64", base_channels=16,
                             depth=3, scale_range=(0.75, 1.5), batch_size=8, accum_steps=1, training_iterations=1200,
                             base_lr=3e-3, warmup_steps=50, decay_factor=2e-3, eval_interval=300,
                             save_model_interval=300, num_workers=1)),
}
# Real street photos at CamVid's scale (a few hundred 480x360 photos), trained for 30 minutes on any machine: a
# small bilinear U-Net at half resolution, the rare classes weighted and pasted into other photos (docs/camvid.md
# tells how each setting was chosen).
REAL_PHOTOS = dict(image_size="240x180", base_channels=16, depth=5, bilinear=True, batch_size=8, accum_steps=1,
                   time_budget=30.0, training_iterations=1200, eval_interval=300, save_model_interval=300, num_workers=1,
                   scale_range=(1.0, 1.0), color_jitter=0.0, copy_paste=0.5, class_weights="auto",
                   logit_adjustment=0.5, base_lr=2e-3, decay_factor=1e-2, ema_decay=0.995)
# A GPU affords CamVid's full 480x360 and a wider model, and its many more epochs want scale and colour augmentation.
REAL_PHOTOS_ON_GPU = dict(image_size="480x360", base_channels=32, training_iterations=6000, eval_interval=500,
                          save_model_interval=500, scale_range=(0.5, 2.0), color_jitter=0.2, decay_factor=2e-3,
                          ema_decay=0.999, num_workers=6)
# A CPU with native bf16 runs more than twice the steps in the same 30 minutes; spent on larger photos, they score
# higher on a drive it never saw than as more steps at 240x180 or as a wider model (docs/camvid.md).
REAL_PHOTOS_ON_BF16_CPU = dict(image_size="320x240")
PRESETS["camvid"] = Preset("CamVid as the SegNet tutorial distributes it (11 classes): a 30-minute run on a 2-core CPU",
                           dict(dataset="camvid", data_root="Dataset/CamVid", data_cache="device", **REAL_PHOTOS),
                           REAL_PHOTOS_ON_GPU, REAL_PHOTOS_ON_BF16_CPU)
PRESETS["folder"] = Preset("your own photos in the folder layout: the camvid preset's recipe",
                           dict(dataset="folder", data_root="Dataset/own", **REAL_PHOTOS), REAL_PHOTOS_ON_GPU,
                           REAL_PHOTOS_ON_BF16_CPU)


def data_kind(root) -> str:
    """The dataset at root: cityscapes, camvid, folder, or synthetic (a Cityscapes layout the generator made)."""
    kind = detect_layout(root)
    if kind is None:
        raise no_dataset_error(root)
    return "synthetic" if kind == "cityscapes" and synthetic_city_settings(root) is not None else kind


def preset_for_data(given) -> tuple[str, str]:
    """(preset, why) when no --preset is given: the data decides."""
    kind, root = given.get("dataset", "auto"), given.get("data_root")
    if kind != "auto":
        return kind, f"--dataset {kind}"
    if root is not None:
        kind = data_kind(root)
        return kind, f"{'a synthetic city' if kind == 'synthetic' else f'{kind} data'} at {root}"
    cityscapes_root = PRESETS["cityscapes"].settings["data_root"]
    if has_cityscapes(cityscapes_root):
        return "cityscapes", f"Cityscapes found at {cityscapes_root}"
    return "synthetic", f"no Cityscapes at {cityscapes_root}; see Dataset/readme.md for the real data"


def runs_on_gpu(device) -> bool:
    """Whether --device (auto, cpu, cuda, cuda:1, ...) will train on a GPU here."""
    return device.startswith("cuda") or device == "auto" and torch.cuda.is_available()


def machine_settings(preset: Preset, given: dict) -> tuple[dict, str]:
    """What the preset changes for the machine a new run trains on, and where: its on_gpu settings on a GPU, its
    on_bf16_cpu settings on a CPU that computes bf16 natively and trains in it (--amp auto or bf16), else none;
    less what the flags given set, so that the first line names only what the preset changed."""
    device = given.get("device", "auto")
    on_cpu = device in ("auto", "cpu")  # auto without a GPU is the CPU
    if runs_on_gpu(device):
        changes, machine = preset.on_gpu, ON_GPU
    elif on_cpu and given.get("amp", "auto") in ("auto", "bf16") and runtime.cpu_has_native_bf16():
        changes, machine = preset.on_bf16_cpu, ON_BF16_CPU
    else:
        return {}, ""
    return {key: value for key, value in changes.items() if key not in given}, machine


def resolve(given: dict, checkpoint_config=None, world_size=1) -> tuple[TrainConfig, str]:
    """(config, what chose its preset) from the flags given explicitly and, when resuming, the checkpoint's
    config (its preset and settings carry over). The dataset's layout is --dataset's, else the one found at
    an explicit --data_root, else the preset's."""
    if checkpoint_config is not None:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        settings = {key: value for key, value in checkpoint_config.items() if key in known}
        settings = with_step_count({**settings, **given, "world_size": world_size}, given, new_run=False)
        return TrainConfig(**settings), "the checkpoint"
    name, why = (given["preset"], "--preset") if given.get("preset") else preset_for_data(given)
    if name not in PRESETS:
        raise UserError(f"--preset {name}: no such preset; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    for_machine, machine = machine_settings(preset, given)
    if for_machine:
        why += f"; {machine}: " + " ".join(f"--{key} {value}" for key, value in for_machine.items())
    settings = {**preset.settings, **for_machine, "preset": name, **given, "world_size": world_size}
    if settings.get("class_weights") == "none" and "logit_adjustment" not in given:
        settings.pop("logit_adjustment", None)  # the preset's adjustment has no class weights to adjust
    if given.get("dataset", "auto") == "auto":
        settings["dataset"] = data_kind(given["data_root"]) if "data_root" in given else PRESETS[name].settings["dataset"]
    elif "data_root" not in given:  # --dataset alone: where that dataset's own preset keeps it
        settings["data_root"] = PRESETS[given["dataset"]].settings["data_root"]
    if settings["dataset"] == "cityscapes" and not has_cityscapes(settings["data_root"]):
        raise UserError(f"{settings['data_root']}: no Cityscapes here (needs leftImg8bit/ and gtFine/ with train and "
                        f"val; see Dataset/readme.md)")
    settings["out_dir"] = settings.get("out_dir") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return TrainConfig(**with_step_count(settings, given)), why


def with_step_count(settings, given, new_run=True) -> dict:
    """--training_iterations given explicitly wins over a --time_budget of the preset or the checkpoint (both given
    is an error); a new run with a budget has no step count until it has timed itself."""
    if "time_budget" in given and "training_iterations" in given:
        raise UserError("--time_budget and --training_iterations: give one (the budget fixes the step count)")
    if "training_iterations" in given:
        return {**settings, "time_budget": 0.0}
    return {**settings, "training_iterations": None} if new_run and settings.get("time_budget") else settings


# what a resumed run cannot change, and why
RESUME_FIXED = {
    "preset": "its settings came from it", "base_channels": "its weights have that shape", "depth": "its weights have that shape",
    "bilinear": "its weights have that shape", "input_norm": "its weights learned from inputs normalised that way",
    "dataset": "its model predicts that data's classes",
    "classes": "its model predicts those classes", "class_weights": "its loss weights stay as they were",
    "logit_adjustment": "its model's head started from that shift",
    "ema_decay": "its weight average continues as it was",
    "data_cache": "the two pipelines draw different augmentations, so the resume would not be exact",
    "time_budget": "its step count comes from that budget (give --training_iterations to change it)",
}


def shown(value) -> str:
    """A flag's value as typed: a list or tuple as its words."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def from_command_line(given, world_size):
    """(config, checkpoint or None) from the flags given explicitly: a new run's (the chosen preset and why
    printed first), or, with --resume, the checkpoint's config with the flags on top."""
    resume_path = find_resume_checkpoint(given.get("resume"), given.get("out_dir"))
    if not resume_path:
        out_dir = Path(given.get("out_dir") or "")
        if given.get("out_dir") and given.get("resume") != "auto" and (out_dir / "metrics.jsonl").exists():
            raise UserError(f"{out_dir}: holds a run already; continue it with --resume auto, or choose another "
                            f"--out_dir")
        config, why = resolve(given, world_size=world_size)
        print(f"preset {config.preset} ({why}); flags given: {' '.join(f'--{key}' for key in given) or 'none'}")
        return config, None
    checkpoint = read_checkpoint(resume_path)
    made_with = {**TrainConfig().to_dict(), **checkpoint["config"]}
    for key, reason in RESUME_FIXED.items():
        wanted = list(given[key]) if isinstance(given.get(key), (list, tuple)) else given.get(key)
        if key in given and wanted != made_with[key] and not (key == "dataset" and wanted == "auto"):
            trained = "the dataset's default classes" if made_with[key] is None else f"--{key} {shown(made_with[key])}"
            raise UserError(f"--{key} {shown(wanted)}: {resume_path} was trained with {trained}; {reason}")
    given = {**given, "out_dir": given.get("out_dir", str(Path(resume_path).parent)), "resume": resume_path}
    config, _ = resolve(given, checkpoint["config"], world_size)
    return config, checkpoint


def presets_help() -> str:
    """The --help epilog: every preset, what it is for and what it sets."""
    lines = ["presets (--preset NAME; without it the data decides):"]
    for name, preset in PRESETS.items():
        settings = ", ".join(f"{key}={' '.join(map(str, value)) if isinstance(value, tuple) else value}"
                             for key, value in preset.settings.items())
        lines += [f"  {name}: {preset.description}", *textwrap.wrap(f"sets {settings}", 100, initial_indent=" " * 6,
                                                                     subsequent_indent=" " * 6)]
        for machine, changes in preset.machine_changes():
            changed = ", ".join(f"{key}={value}" for key, value in changes.items())
            lines += textwrap.wrap(f"{machine}: {changed}", 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def build_parser(description) -> argparse.ArgumentParser:
    """A flag per TrainConfig field, defaulting to None so that resolve() can tell given flags from defaults;
    each help ends with the default and every preset's own value."""
    parser = argparse.ArgumentParser(description=description, epilog=presets_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for config_field in dataclasses.fields(TrainConfig):
        if not config_field.metadata:
            continue
        options = dict(config_field.metadata)
        help_text, group = options.pop("help"), options.pop("group")
        if config_field.name == "preset":
            options["choices"] = list(PRESETS)
        elif "(default:" not in help_text:
            help_text += f" ({default_note(config_field)})"
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(f"--{config_field.name}", default=None, help=help_text, **options)
    return parser


def default_note(config_field) -> str:
    """'default: 64; synthetic: 16; camvid: 16 (32 on a GPU, ...)': the field's default and each preset that sets
    another value, or another on some machines."""
    note = f"default: {shown(config_field.default)}"
    for name, preset in PRESETS.items():
        value = preset.settings.get(config_field.name, config_field.default)
        elsewhere = [f"{shown(changes[config_field.name])} {machine}" for machine, changes in preset.machine_changes()
                     if changes.get(config_field.name, value) != value]
        if value != config_field.default or elsewhere:
            note += f"; {name}: {shown(value)}" + (f" ({', '.join(elsewhere)})" if elsewhere else "")
    return note


def with_class_statistics(config, train_set, rank) -> TrainConfig:
    """The config completed with what the train masks decide, found once so that a resume uses the same: the class
    weights (class_weight_values, from --class_weights) and, with --copy_paste and no --paste_classes, the classes
    it pastes (median-frequency weight above 1: rarer than the median class). The masks are scanned on rank 0 and
    the result shared with the other ranks."""
    names = train_set.class_table.names
    unknown = [name for name in config.paste_classes or () if name not in names]
    if unknown:
        raise UserError(f"--paste_classes: {unknown} not among the classes trained ({', '.join(names)})")
    balancing = None
    if (config.class_weights in COMPUTED_CLASS_WEIGHTS and config.class_weight_values is None
            or config.copy_paste > 0 and config.paste_classes is None):
        balancing = [median_frequency_weights(*train_set.class_pixels()).tolist() if rank == 0 else None]
        if config.world_size > 1:
            dist.broadcast_object_list(balancing)
        balancing = balancing[0]
    weights = config.class_weight_values or class_weights(config.class_weights, names, balancing)
    paste_classes = config.paste_classes
    if config.copy_paste > 0 and paste_classes is None:
        paste_classes = tuple(names[c] for c, weight in enumerate(balancing) if weight > 1)
    if rank == 0 and weights and not config.class_weight_values:
        print("class weights: " + ", ".join(f"{name} {weight:g}" for name, weight in zip(names, weights)))
    if rank == 0 and config.copy_paste > 0:
        print(f"copy-paste ({config.copy_paste:g} of the train photos): "
              + (", ".join(paste_classes) or "none, no class is rarer than the median"))
    return dataclasses.replace(config, class_weight_values=weights, paste_classes=paste_classes)


def class_weights(choice, names, balancing) -> tuple | None:
    """--class_weights as numbers: none -> None, auto -> the median-frequency weights `balancing`, sqrt -> their
    square root, a file -> its numbers, one per class; rounded to 4 significant digits, as config.json keeps them."""
    if choice == "none":
        return None
    if choice in COMPUTED_CLASS_WEIGHTS:
        weights = balancing if choice == "auto" else [math.sqrt(weight) for weight in balancing]
    else:
        try:
            weights = [float(word) for word in Path(choice).read_text().split()]
        except ValueError:
            raise UserError(f"{choice}: --class_weights expects a file of numbers, one per class") from None
        if len(weights) != len(names) or not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise UserError(f"{choice}: {len(weights)} weights for {len(names)} classes; give one number >= 0 per "
                            f"class ({', '.join(names)}), not all 0")
    return tuple(float(f"{weight:.4g}") for weight in weights)
