"""Inference speed on a folder: inference.py's predict path vs a naive one-image-at-a-time loop.

    python -m bench.inference_speed                          # demo-sized model, 8 raw 2048x1024 photos
    python -m bench.inference_speed --base_channels 64 --device cuda --batch_size 16 --record

Both write the same three files per photo (mask, colour, overlay at the photo's resolution) into
bench/out. Ours: inference.predict (DataLoader decoding, batches under inference_mode, logits
upsampled to the photo size, threaded PNG/JPEG encoding). Naive: PIL open, resize, model, logits
upsampled to the photo size and argmax (the same masks), save, one photo after the other in the main
process. The model is a
random-init UNet saved as a training.py checkpoint: speed does not depend on the weights.
Runs are timed round-robin, median of --repeats, after one warm-up run each.
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import inference
import synthetic_city
from bench import harness
from dataset import MEAN, STD, ClassTable
from runtime import resolve_device, size_arg
from unet import UNet, load_weights, save_weights
from visualize import colorize, overlay

BENCH_OUT = Path(__file__).resolve().parent / "out"


def make_inputs(num_images):
    """A folder of num_images 2048x1024 street photos (the synthetic city's, copied flat)."""
    root = BENCH_OUT / "photos_2048x1024"
    synthetic_city.generate(root / "city", 0, 0, size=(2048, 1024), seed=1, num_test=num_images)
    folder = root / "flat"
    folder.mkdir(exist_ok=True)
    for path in sorted((root / "city" / "leftImg8bit" / "test").glob("*/*.png")):
        if not (folder / path.name).exists():
            os.link(path, folder / path.name)
    return folder


def make_checkpoint(base_channels, image_size):
    """A random-init UNet in the weights format training.py writes."""
    torch.manual_seed(0)
    model = UNet(base_channels=base_channels)
    classes = ClassTable.from_names()
    path = BENCH_OUT / f"unet_base{base_channels}_{image_size[0]}x{image_size[1]}.pth"
    save_weights(path, model, class_names=classes.names, class_colors=classes.colors, image_size=image_size,
                 mean=MEAN, std=STD, dataset="cityscapes")
    return path


@torch.inference_mode()
def naive_predict(checkpoint, input_dir, output_dir, device):
    """The seed-style loop: one photo at a time, nothing overlapped."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model = checkpoint.model.to(device).eval()
    colors = ClassTable.from_names(checkpoint.class_names).colors
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for path in sorted(input_dir.iterdir()):
        photo = Image.open(path).convert("RGB")
        resized = np.array(photo.resize(checkpoint.image_size, Image.BILINEAR))
        image = (torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - mean) / std
        logits = model(image[None].to(device))
        full_size = torch.nn.functional.interpolate(logits, size=(photo.height, photo.width), mode="bilinear",
                                                    align_corners=False)
        mask = full_size.argmax(1)[0].byte().cpu().numpy()
        Image.fromarray(mask).save(output_dir / f"{path.stem}_mask.png")
        Image.fromarray(colorize(mask, colors)).save(output_dir / f"{path.stem}_color.png")
        Image.fromarray(overlay(np.asarray(photo), mask, colors)).save(output_dir / f"{path.stem}_overlay.jpg",
                                                                       quality=90)


def run(args):
    device = resolve_device(args.device)
    header = harness.machine_header(device)
    print(header)
    input_dir = make_inputs(args.num_images)
    checkpoint_path = make_checkpoint(args.base_channels, args.image_size)
    segmenter = inference.Segmenter(checkpoint_path, device=args.device)
    naive_checkpoint = load_weights(checkpoint_path)
    ours_args = inference.parse_args(["--checkpoint", str(checkpoint_path), "--input", str(input_dir),
                                      "--output", str(BENCH_OUT / "predictions_ours"), "--device", args.device,
                                      "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers)])
    candidates = {
        "inference.py": lambda: inference.predict(ours_args, segmenter),
        "naive loop": lambda: naive_predict(naive_checkpoint, input_dir, BENCH_OUT / "predictions_naive", device),
    }
    times = harness.interleaved_times(candidates, args.repeats, device)
    naive_rate = args.num_images / harness.median(times["naive loop"])
    rows = []
    for name, seconds in times.items():
        rate = args.num_images / harness.median(seconds)
        rows.append([name, f"{harness.median(seconds):.2f}", f"{rate:.2f}", f"{rate / naive_rate:.2f}x"])
    width, height = args.image_size
    body = (f"{args.num_images} photos 2048x1024 -> UNet base {args.base_channels} at {width}x{height} -> 3 files "
            f"each; inference.py batch {args.batch_size}, {args.num_workers} workers; median of {args.repeats} "
            f"interleaved runs\n\n")
    body += harness.format_table(["path", "s per folder", "img/s", "vs naive"], rows)
    harness.report("inference_speed", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=8, help="photos in the folder (default: 8)")
    parser.add_argument("--base_channels", type=int, default=16,
                        help="UNet width (default: 16, the synthetic demo; 64 = the classic)")
    parser.add_argument("--image_size", type=size_arg, default=(512, 256), help="model input WxH (default: 512x256)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--batch_size", type=int, default=8, help="inference.py batch size (default: 8)")
    parser.add_argument("--num_workers", type=int, default=2, help="inference.py decoding workers (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (default: 3)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if min(args.num_images, args.base_channels, args.batch_size, args.repeats) < 1 or args.num_workers < 0:
        parser.error("--num_images, --base_channels, --batch_size, --repeats must be >= 1, --num_workers >= 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
