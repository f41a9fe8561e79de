"""Memory under load: peak resident set of `python inference.py` on folders of 100 and 2,000 photos. Bounded
queues between the loader, the model and the writers should keep it flat, whatever the folder's size.

    python -m bench.inference_memory                         # 100 and 2000 photos of 640x480, demo-sized model
    python -m bench.inference_memory --counts 100 2000 --record

Each folder runs in a process of its own; the peak is that process's ru_maxrss (the largest resident set of
it and of its DataLoader workers), read when it exits.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import harness
from bench.inference_speed import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
BENCH_OUT = REPO / "bench" / "out"


def make_photos(count, size):
    """A folder of `count` JPEG street-sized photos (smooth random colours), made once and reused."""
    folder = BENCH_OUT / f"photos_{size[0]}x{size[1]}_{count}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    for index in range(count):
        path = folder / f"photo_{index:05d}.jpg"
        if not path.exists():
            coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize(size, Image.BILINEAR).save(path, quality=90)
    return folder


def peak_rss_mib(command):
    """(peak resident set in MiB, seconds) of a command run to its end."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise ValueError(f"{' '.join(command)} failed with exit status {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024, seconds


def run(args):
    header = harness.machine_header(torch.device("cpu"))
    print(header)
    checkpoint = make_checkpoint(args.base_channels, (512, 256))
    rows = []
    for count in args.counts:
        photos = make_photos(count, args.photo_size)
        command = [sys.executable, "inference.py", "--checkpoint", str(checkpoint), "--input", str(photos),
                   "--output", str(BENCH_OUT / f"predictions_{count}"), "--device", "cpu"]
        peak, seconds = peak_rss_mib(command)
        rows.append([count, f"{peak:.0f}", f"{seconds:.0f}", f"{count / seconds:.1f}"])
        print(rows[-1], flush=True)
    width, height = args.photo_size
    body = (f"`python inference.py` (defaults: batch 8, {min(4, os.cpu_count() or 1)} workers) on folders of "
            f"{width}x{height} JPEGs, UNet base {args.base_channels} at 512x256\n\n")
    body += harness.format_table(["photos", "peak RSS MiB", "s", "img/s"], rows)
    harness.report("inference_memory", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 2000], help="folder sizes (default: 100 2000)")
    parser.add_argument("--photo_size", type=harness.size_arg, default=(640, 480), help="WxH (default: 640x480)")
    parser.add_argument("--base_channels", type=int, default=16, help="UNet width (default: 16, the demo's)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if min(args.counts) < 1 or args.base_channels < 1:
        parser.error("--counts and --base_channels must be >= 1")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
