"""Video inference end to end against the model alone, and its memory over clip lengths.

    python -m bench.video --frames_dir ../shared/camvid/val --checkpoint unet_model.pth
    python -m bench.video --frames_dir ../shared/camvid/val --rss_minutes 1 10

Speed: a --seconds clip at --rate made from --frames_dir's photos (consecutive frames of one drive, looped), timed
round-robin: inference.py on the video file (decode, resize, model, upsample, argmax, overlay, H.264 encode) against
the model alone (Segmenter.scores in batches of --batch_size) on the same frames already decoded and resized in
memory. Without --checkpoint the model is an untrained one of the camvid preset's architecture and size: speed does
not depend on the weights. Memory: the peak resident set of inference.py on clips of each --rss_minutes length.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import inference
import video
from bench import harness
from config import PRESETS
from dataset import read_photo
from runtime import size_arg
from unet import UNet, save_weights

BENCH_OUT = Path(__file__).resolve().parent / "out" / "video"
REPO = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames_dir", default="../shared/camvid/val",
                        help="photos that are consecutive frames, in name order (default: %(default)s)")
    parser.add_argument("--checkpoint", help="weights file (default: an untrained model of the camvid preset)")
    parser.add_argument("--seconds", type=float, default=10, help="clip length for the speed test (default: 10)")
    parser.add_argument("--rate", type=int, default=30, help="frames per second of the clips (default: 30)")
    parser.add_argument("--size", type=size_arg, default=(480, 360), help="frame WxH (default: 480x360)")
    parser.add_argument("--batch_size", type=int, default=8, help="frames per forward pass (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--rss_minutes", type=float, nargs="*", default=[],
                        help="also measure peak RSS of inference.py on clips this many minutes long (default: none)")
    parser.add_argument("--rss_checkpoint", help="model for the RSS runs (default: the speed test's model)")
    return parser.parse_args()


def default_checkpoint():
    """An untrained model of the camvid preset (11 classes, 240x180, base 16, depth 5, bilinear)."""
    settings = PRESETS["camvid"].settings
    path = BENCH_OUT / "camvid_untrained.pth"
    torch.manual_seed(0)
    model = UNet(3, 11, base_channels=settings["base_channels"], depth=settings["depth"], dropout=0.0,
                 bilinear=settings["bilinear"])
    names = [f"class{index}" for index in range(11)]
    save_weights(path, model, class_names=names, class_colors=[(20 * i, 255 - 20 * i, 90) for i in range(11)],
                 image_size=size_arg(settings["image_size"]), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 dataset="camvid")
    return path


def make_clip(path, photos, count, rate, size):
    """An H.264 mp4 of `count` frames: the photos in order, looped, resized to `size`."""
    av = video.import_av()
    frames = [np.asarray(read_photo(photo)) for photo in photos]
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=rate, options=video.ENCODER_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index % len(frames)], format="rgb24").reformat(*size)
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return path


def decoded_inputs(path, segmenter):
    """The clip's frames as the model sees them, decoded and resized once, in memory."""
    av = video.import_av()
    with av.open(str(path)) as container:
        return [segmenter.model_input(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def with_cpu_time(run, cpu_seconds):
    """run, also appending the CPU seconds this process spent in it (all threads) to cpu_seconds."""
    def timed():
        start = time.process_time()
        run()
        cpu_seconds.append(time.process_time() - start)
    return timed


def speed(args, checkpoint, clip, count):
    """{candidate: (fps, CPU ms per frame)} for inference.py on the clip and the model alone, timed round-robin.
    CPU time counts every thread of this process, so it shows what decoding and encoding add even when other
    processes on a shared machine make the wall-clock fps noisy."""
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    inputs = decoded_inputs(clip, segmenter)
    batches = [torch.stack(inputs[start:start + args.batch_size]) for start in range(0, len(inputs), args.batch_size)]
    cli = inference.parse_args(["--checkpoint", str(checkpoint), "--device", "cpu", "--input", str(clip),
                                "--output", str(BENCH_OUT / "overlay"), "--batch_size", str(args.batch_size)])
    def model_alone():
        for batch in batches:
            segmenter.scores(batch)  # dropped at once, as the video path does: keeping all would page in fresh memory

    cpu = {"video": [], "model": []}
    candidates = {"video": with_cpu_time(lambda: inference.predict(cli, segmenter), cpu["video"]),
                  "model": with_cpu_time(model_alone, cpu["model"])}
    times = harness.interleaved_times(candidates, args.repeats, torch.device("cpu"))
    for name, values in times.items():
        print(f"{name}: fps per round {', '.join(f'{count / value:.1f}' for value in values)}")
    return {name: (count / harness.median(times[name]), 1000 * harness.median(cpu[name][-args.repeats:]) / count)
            for name in times}


def peak_rss_mib(checkpoint, clip, batch_size):
    """Peak resident set of one inference.py process on the clip (wait4's ru_maxrss is this child's alone)."""
    process = subprocess.Popen([sys.executable, str(REPO / "inference.py"), "--checkpoint", str(checkpoint),
                                "--device", "cpu", "--input", str(clip), "--output", str(BENCH_OUT / "rss"),
                                "--batch_size", str(batch_size)], stdout=subprocess.DEVNULL)
    start = time.perf_counter()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise ValueError(f"inference.py failed on {clip} (exit status {process.returncode})")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def run(args):
    photos = sorted(path for path in Path(args.frames_dir).iterdir() if path.suffix.lower() in (".png", ".jpg"))
    if not photos:
        raise ValueError(f"{args.frames_dir}: no photos")
    shutil.rmtree(BENCH_OUT, ignore_errors=True)
    BENCH_OUT.mkdir(parents=True)
    checkpoint = args.checkpoint or default_checkpoint()
    count = round(args.seconds * args.rate)
    clip = make_clip(BENCH_OUT / "clip.mp4", photos, count, args.rate, args.size)
    print(harness.machine_header(torch.device("cpu")))
    width, height = args.size
    results = speed(args, checkpoint, clip, count)
    (video_fps, video_cpu), (model_fps, model_cpu) = results["video"], results["model"]
    rows = [[f"{count} frames {width}x{height}, batch {args.batch_size}", f"{video_fps:.1f}", f"{model_fps:.1f}",
             f"{video_fps / model_fps:.2f}", f"{video_cpu:.0f}", f"{model_cpu:.0f}", f"{model_cpu / video_cpu:.2f}"]]
    print(harness.format_table(["clip", "inference.py on the video (fps)", "model alone (fps)", "ratio",
                                "video CPU ms/frame", "model CPU ms/frame", "CPU ratio"], rows))
    rss_rows = []
    for minutes in args.rss_minutes:
        long_clip = make_clip(BENCH_OUT / f"clip_{minutes:g}min.mp4", photos, round(minutes * 60 * args.rate),
                              args.rate, args.size)
        peak, seconds = peak_rss_mib(args.rss_checkpoint or checkpoint, long_clip, args.batch_size)
        frames = round(minutes * 60 * args.rate)
        rss_rows.append([f"{minutes:g} min ({frames} frames)", f"{peak:.0f}", f"{seconds:.0f}"])
        long_clip.unlink()
    if rss_rows:
        print(harness.format_table(["clip", "peak RSS (MiB)", "wall (s)"], rss_rows))


if __name__ == "__main__":
    harness.main(run, parse_args)
