"""Flicker and accuracy of video inference with and without --smooth, on a labelled drive.

    python -m bench.flicker --checkpoint runs/base_driveout/best_model.pth --data_root Dataset/camvid_driveout

The split's photos (CamVid: consecutive labelled frames of one drive, in name order) become a near-lossless H.264
clip; inference.py segments it with --frames once per --smooth value. For each: the share of pixels whose class
changes between consecutive frames (flicker; real motion changes some too) and the mIoU of the frames' masks
against the split's labels.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

import inference
import video
from bench import harness
from dataset import open_layout, read_label_png, read_photo
from metrics import ConfusionMatrix

BENCH_OUT = Path(__file__).resolve().parent / "out" / "flicker"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights file")
    parser.add_argument("--data_root", required=True, help="a CamVid-layout dataset whose split is one drive")
    parser.add_argument("--split", default="val", help="split (default: val)")
    parser.add_argument("--smooth", type=int, nargs="+", default=[1, 2, 3, 5], help="values (default: 1 2 3 5)")
    parser.add_argument("--batch_size", type=int, default=8, help="frames per forward pass (default: 8)")
    return parser.parse_args()


def make_clip(path, photos):
    """A near-lossless (qp 0, 4:4:4) H.264 clip of the photos, so the masks score what the model sees."""
    av = video.import_av()
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=30, options={"qp": "0", "preset": "veryfast"})
        first = read_photo(photos[0])
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv444p"
        for photo in photos:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(read_photo(photo)), format="rgb24")
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return path


def measure(args, clip, labels, num_classes, smooth):
    """(flicker, mIoU) of inference.py --smooth `smooth` on the clip."""
    output = BENCH_OUT / f"smooth{smooth}"
    cli = inference.parse_args(["--checkpoint", str(args.checkpoint), "--device", "cpu", "--input", str(clip),
                                "--output", str(output), "--frames", "--smooth", str(smooth),
                                "--batch_size", str(args.batch_size)])
    if inference.predict(cli, inference.load_segmenter(cli)) != 0:
        raise ValueError(f"inference.py failed on {clip}")
    masks = [read_label_png(path) for path in sorted((output / clip.stem).glob("*_mask.png"))]
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks for {len(labels)} labelled frames")
    changed = np.mean([(before != after).mean() for before, after in zip(masks, masks[1:])])
    confusion = ConfusionMatrix(num_classes)
    for mask, label in zip(masks, labels):
        confusion.update(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
    return changed, float(confusion.compute()["miou"])


def run(args):
    layout = open_layout(args.data_root)
    samples = sorted(layout.samples(args.split))
    segmenter = inference.Segmenter(args.checkpoint, device="cpu")
    table = layout.class_table(segmenter.class_names)
    labels = [table.label_to_train[layout.read_mask(mask)] for _, mask in samples]  # void -> 255, ignored
    shutil.rmtree(BENCH_OUT, ignore_errors=True)
    BENCH_OUT.mkdir(parents=True)
    drives = sorted({photo.name.split("_")[0] for photo, _ in samples})
    clip = make_clip(BENCH_OUT / "drive.mp4", [photo for photo, _ in samples])
    print(harness.machine_header(torch.device("cpu")))
    print(f"{args.data_root} {args.split}: {len(samples)} labelled frames of drive {', '.join(drives)}")
    rows = []
    for smooth in args.smooth:
        changed, miou = measure(args, clip, labels, table.num_classes, smooth)
        rows.append([str(smooth), f"{100 * changed:.2f}%", f"{miou:.4f}"])
    print(harness.format_table(["--smooth", "pixels changing class between frames", "mIoU"], rows))


if __name__ == "__main__":
    harness.main(run, parse_args)
