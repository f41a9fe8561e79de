"""The headline number: wall time of N full-size epochs of `python training.py` with MFU.

    python -m bench.epoch                                          # CPU: a 4-image subset, 1 epoch
    python -m bench.epoch --device cuda --train_images 2975 --epochs 10 --batch_size 32 --compile --record
    python -m bench.epoch --device cuda --train_images 2975 --epochs 10 --batch_size 32 --compile \
        --data_cache device --record

Runs the real training.py (a subprocess, as a user would) on the synthetic city at Cityscapes'
training size (512x256), classic U-Net (base 64), no periodic evaluation (one final one, as every
run ends with). Reported: total wall time (start-up, data loading, the final evaluation and the
checkpoints included), the steady training img/s from its metrics.jsonl, MFU = img/s x FLOPs
per training image (FlopCounterMode) / peak, and the share of the time the loop waited for batches
(data_wait: near 0 means the input pipeline keeps up). Compared with the seed's reported run: 10 epochs of
2975 images in 4.5 h on an RTX 4090 = 1.85 img/s.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import synthetic_city
from bench import harness
from bench.train_step import training_flops
from runtime import resolve_device

REPO = Path(__file__).resolve().parent.parent
BENCH_OUT = REPO / "bench" / "out"
SEED_IMAGES_PER_SECOND = 10 * 2975 / (4.5 * 3600)  # the seed's 10 epochs on an RTX 4090


def run(args):
    device = resolve_device(args.device)
    peak_tflops, peak_note = harness.peak_tflops(args, device)
    header = harness.machine_header(device)
    print(header)
    data_root = BENCH_OUT / f"synthetic_512x256_{args.train_images}"
    synthetic_city.generate(data_root, args.train_images, args.val_images, size=(512, 256), seed=0)
    run_dir = BENCH_OUT / "epoch_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # bench output only, never user data
    steps = max(1, args.epochs * args.train_images // args.batch_size)
    command = [sys.executable, "training.py", "--dataset", "synthetic", "--data_root", str(data_root),
               "--image_size", "512x256", "--base_channels", "64", "--batch_size", str(args.batch_size),
               "--accum_steps", "1", "--training_iterations", str(steps), "--eval_interval", str(steps),
               "--save_model_interval", str(steps), "--log_interval", str(max(1, min(10, steps // 4))),
               "--device", args.device, "--num_workers", str(args.num_workers), "--out_dir", str(run_dir),
               "--model_path", str(run_dir / "unet_model.pth"), "--data_cache", args.data_cache] + \
        (["--compile"] if args.compile else [])
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [record for record in records if record.get("img_per_s")]
    steady_logs = logs[1:] or logs  # the first log interval holds compilation and warm-up
    steady = harness.median([record["img_per_s"] for record in steady_logs])
    data_wait = harness.median([record["data_wait"] for record in steady_logs])
    flops_per_image = training_flops("ours", dict(base_channels=64, depth=4, image_size=(512, 256), batch_size=1))
    images = steps * args.batch_size
    rows = [["wall time, whole run", f"{wall:.1f} s", f"{images / wall:.2f} img/s",
             f"{100 * images * flops_per_image / wall / 1e12 / peak_tflops:.1f}%"],
            ["steady training (metrics.jsonl)", f"{images / steady:.1f} s of training", f"{steady:.2f} img/s",
             f"{100 * steady * flops_per_image / 1e12 / peak_tflops:.1f}%"],
            ["waiting for batches (metrics.jsonl data_wait, median)", f"{100 * data_wait:.1f}% of the time", "", ""]]
    body = (f"{args.epochs} epoch(s) of {args.train_images} synthetic 512x256 images, UNet base 64, batch "
            f"{args.batch_size}, compile {args.compile}, data cache {args.data_cache}, {args.num_workers} workers; "
            f"{flops_per_image / 1e9:.0f} GFLOP per training image; peak {peak_tflops:.2f} TFLOP/s ({peak_note})\n\n")
    body += harness.format_table(["measure", "time", "throughput", "MFU"], rows)
    body += (f"\n\nsteady img/s vs the seed's reported 1.85 img/s (RTX 4090): {steady / SEED_IMAGES_PER_SECOND:.2f}x; "
             f"10 epochs of 2975 images at this rate: {10 * 2975 / steady / 60:.1f} min")
    harness.report("epoch", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--train_images", type=int, default=None,
                        help="synthetic train images (default: 2975 on CUDA, 4 on CPU)")
    parser.add_argument("--val_images", type=int, default=2, help="synthetic val images (default: 2)")
    parser.add_argument("--epochs", type=int, default=1, help="(default: 1)")
    parser.add_argument("--batch_size", type=int, default=None, help="(default: 32 on CUDA, 1 on CPU)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="training.py --num_workers (default: min(8, cores))")
    parser.add_argument("--compile", action="store_true", help="training.py --compile")
    parser.add_argument("--data_cache", choices=["off", "device"], default="off",
                        help="training.py --data_cache (default: off)")
    parser.add_argument("--peak_tflops", type=float, help="peak for MFU")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    on_cuda = resolve_device(args.device, 0).type == "cuda"
    args.train_images = args.train_images or (2975 if on_cuda else 4)
    args.batch_size = args.batch_size or (32 if on_cuda else 1)
    if min(args.train_images, args.val_images, args.epochs, args.batch_size) < 1:
        parser.error("--train_images, --val_images, --epochs and --batch_size must be >= 1")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args, errors=(ValueError, FileNotFoundError, subprocess.CalledProcessError))
