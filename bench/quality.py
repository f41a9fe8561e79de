"""Recipes side by side on real photos: each variant trained by `python training.py` on CamVid on the same
machine, then scored by `python inference.py --evaluate` (val split, the labels' full 480x360 resolution):
minutes, val mIoU and per-class IoU in one table.

    python -m bench.quality --data_root ../shared/camvid                  # the three variants, ~3 h on 2 cores
    python -m bench.quality --data_root ../shared/camvid --variants camvid --record
    python -m bench.quality --data_root ../shared/camvid --record --extra --training_iterations 275 \
        --eval_interval 275 --save_model_interval 275                     # a quarter of every budget

Variants:
- seed:     the seed's recipe: CE + Dice, no augmentation, no class weights, its schedule (warmup 100, decay
            3e-3), at the size and step count of `defaults`
- defaults: the project's defaults before the camvid preset, adapted to CamVid as a new user would (240x180,
            base 32, depth 4, batch 8, 1100 steps: 30 minutes on an AVX-512 CPU, over an hour on an AVX2 one)
- camvid:   `python training.py --data_root CAMVID`, i.e. the camvid preset, no other flag
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import inference
from bench import harness

REPO = Path(__file__).resolve().parent.parent
BENCH_OUT = REPO / "bench" / "out" / "quality"
NEW_USER = ["--preset", "cityscapes", "--dataset", "camvid", "--image_size", "240x180", "--base_channels", "32",
            "--depth", "4", "--batch_size", "8", "--accum_steps", "1", "--training_iterations", "1100",
            "--eval_interval", "275", "--save_model_interval", "275", "--num_workers", "1"]
VARIANTS = {
    "seed": NEW_USER + ["--scale_range", "1", "1", "--hflip_prob", "0", "--color_jitter", "0"],
    "defaults": NEW_USER,
    "camvid": [],
}


def train_and_score(name, data_root, extra):
    """(minutes of training.py, the evaluation report) of one variant."""
    run_dir = BENCH_OUT / name
    command = [sys.executable, "training.py", "--data_root", str(data_root), *VARIANTS[name], *extra, "--out_dir",
               str(run_dir), "--model_path", str(run_dir / "model.pth")]
    start = time.perf_counter()
    with open(BENCH_OUT / f"{name}.log", "w") as log:
        subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - start) / 60
    status = inference.main(["--checkpoint", str(run_dir / "model.pth"), "--evaluate", "--data_root", str(data_root),
                             "--split", "val", "--output", str(run_dir / "evaluation")])
    if status != 0:
        raise ValueError(f"evaluating {name} failed (exit {status})")
    return minutes, json.loads((run_dir / "evaluation" / "evaluation_val.json").read_text())


def run(args):
    header = harness.machine_header(torch.device("cpu"))
    print(header)
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    rows, names = [], None
    for name in args.variants:
        minutes, report = train_and_score(name, args.data_root, args.extra)
        names = list(report["per_class"])
        ious = [report["per_class"][class_name]["iou"] for class_name in names]
        rows.append([name, f"{minutes:.1f}", f"{report['miou']:.3f}",
                     *("n/a" if iou is None else f"{iou:.2f}" for iou in ious)])
        print(rows[-1], flush=True)
    body = (f"CamVid ({args.data_root}): train 367, scored on val 101 at 480x360 by `inference.py --evaluate`; "
            f"minutes = wall time of `python training.py` (evaluations included)\n\n")
    body += harness.format_table(["variant", "minutes", "val mIoU", *names], rows)
    harness.report("quality", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", required=True, help="CamVid as the SegNet tutorial distributes it")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="what to train (default: all)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="training.py flags added to every variant, e.g. --extra --training_iterations 20")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    harness.main(run, parse_args)
