"""Data-loading speed: DataLoader img/s over raw 2048x1024 PNGs vs the prepared 512x256 copy, with and
without augmentation, vs torchvision.datasets.Cityscapes + PIL resize, vs training.py's
--data_cache device path (batched augmentation of a uint8 cache); and the issue-3 target, the
prepared+augmented loader >= 5x the CPU training throughput of the default model.

    python -m bench.data_loading                    # 40 raw synthetic images in bench/out (made once)
    python -m bench.data_loading --train_img_s 0.15 --record

Raw data: synthetic_city.generate(..., size=(2048, 1024)) into bench/out (git-ignored), prepared once
with dataset.prepare. Every loader uses --num_workers persistent workers and --batch_size; passes
over the train split are timed round-robin after one warm-up pass each (median of --repeats).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import Cityscapes
from torchvision.transforms.v2 import functional as TF

import synthetic_city
from batches import DeviceCache
from bench import harness
from bench.train_step import build_step
from dataset import MEAN, STD, SegmentationDataset, prepare
from runtime import resolve_device

BENCH_OUT = Path(__file__).resolve().parent / "out"


def CityscapesDataset(root, split, image_size, augment=False):
    return SegmentationDataset(root, split, image_size, augment=augment, layout="cityscapes")
RAW_SIZE = (2048, 1024)
TRAIN_SIZE = (512, 256)


def ensure_data(num_images):
    """(raw root, prepared root); generated and prepared once, reused on later runs."""
    raw, prepared = BENCH_OUT / "raw_2048x1024", BENCH_OUT / "prepared_512x256"
    num_val = max(1, num_images // 5)
    synthetic_city.generate(raw, num_images - num_val, num_val, size=RAW_SIZE, seed=0)
    prepare(raw, prepared, size=TRAIN_SIZE)
    return raw, prepared


class TorchvisionPair:
    """torchvision.datasets.Cityscapes' usual recipe: PIL resize (bilinear image, nearest mask), then
    tensors. Label ids stay ids (torchvision has no train-id mapping); only the speed is compared."""

    def __call__(self, image, mask):
        width, height = TRAIN_SIZE
        image = TF.pil_to_tensor(image.convert("RGB").resize((width, height), Image.BILINEAR))
        mask = torch.from_numpy(np.array(mask.resize((width, height), Image.NEAREST)))
        return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), MEAN, STD), mask.long()


class CachedPasses:
    """Passes over training.py's --data_cache device path: the prepared split held as uint8 tensors on
    --cache_device, each batch gathered and augmented there in one go."""

    def __init__(self, cache, batch_size):
        self.dataset, self.batch_size = cache, batch_size

    def __iter__(self):
        order = torch.randperm(len(self.dataset)).tolist()
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            yield self.dataset.batch(indices, sample_seeds=indices)


def build_loaders(raw, prepared, args):
    datasets = {
        "raw 2048x1024": CityscapesDataset(raw, "train", TRAIN_SIZE),
        "raw 2048x1024 + aug": CityscapesDataset(raw, "train", TRAIN_SIZE, augment=True),
        "prepared 512x256": CityscapesDataset(prepared, "train", TRAIN_SIZE),
        "prepared 512x256 + aug": CityscapesDataset(prepared, "train", TRAIN_SIZE, augment=True),
        "torchvision Cityscapes + PIL resize": Cityscapes(raw, "train", target_type="semantic",
                                                          transforms=TorchvisionPair()),
    }
    loaders = {name: DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                persistent_workers=args.num_workers > 0)
               for name, dataset in datasets.items()}
    cache = DeviceCache(CityscapesDataset(prepared, "train", TRAIN_SIZE), args.cache_device,
                        num_workers=args.num_workers)
    loaders[f"prepared 512x256 + aug, --data_cache device ({args.cache_device.type})"] = \
        CachedPasses(cache, args.batch_size)
    return loaders


def images_per_second(loaders, repeats, device):
    """{name: median img/s} over full passes, round-robin, after one warm-up pass each (starts workers);
    `device` (the cache's) is synchronised after each pass."""
    passes = {name: (lambda loader=loader: sum(len(images) for images, _ in loader)) for name, loader in loaders.items()}
    times = harness.interleaved_times(passes, repeats, device)
    return {name: len(loaders[name].dataset) / harness.median(seconds) for name, seconds in times.items()}


def training_images_per_second(args):
    """Our CPU training step on the default model (classic U-Net at 512x256): median img/s."""
    options = dict(device="cpu", base_channels=args.base_channels, depth=4, image_size=TRAIN_SIZE,
                   batch_size=1, amp="auto", channels_last="auto", compile=False)
    step = build_step("ours", options)
    step()
    seconds = []
    for _ in range(args.train_steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return 1 / harness.median(seconds)


def run(args):
    header = harness.machine_header(args.cache_device)
    print(header)
    raw, prepared = ensure_data(args.num_images)
    rates = images_per_second(build_loaders(raw, prepared, args), args.repeats, args.cache_device)
    reference = rates["raw 2048x1024"]
    rows = [[name, f"{rate:.1f}", f"{rate / reference:.2f}x"] for name, rate in rates.items()]
    body = (f"{args.num_workers} workers, batch {args.batch_size}, {len(CityscapesDataset(raw, 'train', TRAIN_SIZE))} "
            f"train images, median of {args.repeats} interleaved passes\n\n")
    body += harness.format_table(["loader", "img/s", "vs raw"], rows)
    train_rate = args.train_img_s or training_images_per_second(args)
    loader_rate = rates["prepared 512x256 + aug"]
    source = "given by --train_img_s" if args.train_img_s else f"measured, median of {args.train_steps} steps"
    body += (f"\n\nissue 3 target: prepared 512x256 + aug loader {loader_rate:.1f} img/s vs CPU training "
             f"{train_rate:.3f} img/s (UNet base {args.base_channels}, 512x256, batch 1, {source}): "
             f"{loader_rate / train_rate:.0f}x (target >= 5x: {'met' if loader_rate >= 5 * train_rate else 'NOT met'})")
    harness.report("data_loading", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=40, help="raw images to generate, 1/5 of them val "
                        "(default: 40; a different number needs an empty bench/out/raw_2048x1024)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--batch_size", type=int, default=4, help="(default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per loader (default: 3)")
    parser.add_argument("--base_channels", type=int, default=64, help="model for the training rate (default: 64)")
    parser.add_argument("--train_steps", type=int, default=2, help="timed training steps (default: 2)")
    parser.add_argument("--train_img_s", type=float, help="skip measuring training, use this img/s")
    parser.add_argument("--cache_device", default="cpu",
                        help="where the --data_cache device row keeps and augments the split: cpu, cuda, auto "
                             "(default: cpu)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if min(args.num_images, args.batch_size, args.repeats, args.train_steps) < 1 or args.num_workers < 0:
        parser.error("--num_images, --batch_size, --repeats, --train_steps must be >= 1, --num_workers >= 0")
    args.cache_device = resolve_device(args.cache_device)
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
