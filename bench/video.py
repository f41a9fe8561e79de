"""Video inference end to end against the model alone, and its memory over clip lengths.

    python -m bench.video --frames_dir ../shared/camvid/val --checkpoint unet_model.pth
    python -m bench.video --frames_dir ../shared/camvid/val --rss_minutes 1 10
    python -m bench.video --frames_dir ../shared/camvid/val --checkpoint unet_model.pth --stages

Speed: a --seconds clip at --rate made from --frames_dir's photos (consecutive frames of one drive, looped), timed
round-robin: inference.py on the video file (decode, resize, model, upsample, argmax, overlay, H.264 encode) against
the model alone (Segmenter.scores in batches of --batch_size) on the same frames already decoded and resized in
memory, run two ways: in the calling thread, as photos run it ("model"), and in the video's model workers ("model in
workers": on a CPU, two with half the threads each, often the faster). The ratio that counts is the one against the
faster. For reference only, "masks in workers" also upsamples each frame's scores to its full-size mask (argmax),
as every photo needs too: against it, what the video path adds is decoding, the overlay and encoding. Without
--checkpoint the model is an untrained one of the camvid preset's architecture and size: speed does not depend on
the weights. Memory: the peak resident set of inference.py on clips of each --rss_minutes length.
Stages: each step of the video path timed alone, in one thread and in all, to show where the CPU goes.
"""
import argparse
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
from unet import UNet, mask_and_confidence, save_weights

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
    parser.add_argument("--stages", action="store_true",
                        help="also time each stage of the video path alone, in one thread and in all (default: off)")
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
    """{candidate: (fps, CPU ms per frame)} for inference.py on the clip and the model alone (in this thread, and in
    the video's model workers), timed round-robin. CPU time counts every thread of this process, so it shows what
    decoding and encoding add even when other processes on a shared machine make the wall-clock fps noisy."""
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    inputs = decoded_inputs(clip, segmenter)
    batches = [torch.stack(inputs[start:start + args.batch_size]) for start in range(0, len(inputs), args.batch_size)]
    cli = inference.parse_args(["--checkpoint", str(checkpoint), "--device", "cpu", "--input", str(clip),
                                "--output", str(BENCH_OUT / "overlay"), "--batch_size", str(args.batch_size)])
    def model_alone():
        for batch in batches:
            segmenter.scores(batch)  # dropped at once, as the video path does: keeping all would page in fresh memory

    def model_in_workers(work=segmenter.scores):
        with video.model_workers(segmenter) as (pool, workers):
            parts = [part for batch in batches for part in video.batch_parts(batch, workers)]
            for _ in pool.map(work, parts):
                pass

    def masks(part):
        return [mask_and_confidence(scores, args.size[::-1])[0] for scores in segmenter.scores(part)]

    cpu = {"video": [], "model": [], "model in workers": [], "masks in workers": []}
    candidates = {"video": with_cpu_time(lambda: inference.predict(cli, segmenter), cpu["video"]),
                  "model": with_cpu_time(model_alone, cpu["model"]),
                  "model in workers": with_cpu_time(model_in_workers, cpu["model in workers"]),
                  "masks in workers": with_cpu_time(lambda: model_in_workers(masks), cpu["masks in workers"])}
    times = harness.interleaved_times(candidates, args.repeats, torch.device("cpu"))
    for name, values in times.items():
        print(f"{name}: fps per round {', '.join(f'{count / value:.1f}' for value in values)}")
    return {name: (count / harness.median(times[name]), 1000 * harness.median(cpu[name][-args.repeats:]) / count)
            for name in times}


def stage_times(checkpoint, clip, batch_size):
    """[(stage, wall ms a frame, CPU ms a frame)] for each step of the video path run alone over the clip: where
    the CPU goes, and so what is left for the model when everything shares the same cores. The stages run in
    order, each keeping its output for the next."""
    av, segmenter = video.import_av(), inference.Segmenter(checkpoint, device="cpu")
    blend, data = video.PictureOverlay(av, segmenter.class_table.colors, 0.5), {}

    def decode():
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # as video.py decodes
            data["pictures"] = [frame.reformat(format=video.picture_format(frame.width, frame.height))
                                for frame in container.decode(stream)]  # as video.py keeps them: mostly the frame
            data["frames"] = [picture.reformat(format="rgb24").to_ndarray() for picture in data["pictures"]]

    def model():
        inputs = data["inputs"]
        data["scores"] = [score for start in range(0, len(inputs), batch_size)
                          for score in segmenter.scores(torch.stack(inputs[start:start + batch_size]))]

    def encode():
        path = BENCH_OUT / "stages.mp4"
        writer = video.OverlayWriter(av, path, 30)
        for picture in data["overlays"]:
            writer.write(picture)
        writer.close(path)

    stages = {"decode to RGB": decode,
              "resize and normalise": lambda: data.update(inputs=[segmenter.model_input(frame)
                                                                  for frame in data["frames"]]),
              f"model (batches of {batch_size})": model,
              "upsample and argmax": lambda: data.update(masks=[mask_and_confidence(score, frame.shape[:2])[0]
                                                                for score, frame in zip(data["scores"],
                                                                                        data["frames"])]),
              "overlay": lambda: data.update(overlays=[blend(picture, mask)
                                                       for picture, mask in zip(data["pictures"], data["masks"])]),
              "H.264 encode": encode}
    rows, threads = [], torch.get_num_threads()
    for name, stage in stages.items():
        cells = [name]
        for count in (1, threads):
            torch.set_num_threads(count)
            stage()  # warm up
            wall, cpu = time.perf_counter(), time.process_time()
            stage()
            cells += [f"{1000 * (time.perf_counter() - wall) / len(data['frames']):.1f}",
                      f"{1000 * (time.process_time() - cpu) / len(data['frames']):.1f}"]
        rows.append(cells)
    torch.set_num_threads(threads)
    return rows


# inference.py run so that it reports its own peak: the kernel's VmHWM of the process after exec. wait4's ru_maxrss
# would also count the forked copy of this (much larger) benchmark process before exec.
PEAK_REPORTER = ("import atexit, runpy, sys; atexit.register(lambda: print(next(line for line in open('/proc/self/status') "
                 "if line.startswith('VmHWM')), file=sys.stderr)); sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def peak_rss_mib(checkpoint, clip, batch_size):
    """Peak resident set of one inference.py process on the clip, and its wall time."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_REPORTER, str(REPO / "inference.py"), "--checkpoint",
                             str(checkpoint), "--device", "cpu", "--input", str(clip), "--output",
                             str(BENCH_OUT / "rss"), "--batch_size", str(batch_size)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [line for line in result.stderr.splitlines() if line.startswith("VmHWM")]
    if result.returncode != 0 or not peak:
        raise ValueError(f"inference.py failed on {clip} (exit status {result.returncode})")
    return int(peak[-1].split()[1]) / 1024, time.perf_counter() - start


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
    video_fps, video_cpu = results.pop("video")
    rows = [[f"{count} frames {width}x{height}, batch {args.batch_size}", name, f"{video_fps:.1f}", f"{model_fps:.1f}",
             f"{video_fps / model_fps:.2f}", f"{video_cpu:.0f}", f"{model_cpu:.0f}", f"{model_cpu / video_cpu:.2f}"]
            for name, (model_fps, model_cpu) in results.items()]
    print(harness.format_table(["clip", "against", "inference.py on the video (fps)", "alone, frames in memory (fps)",
                                "ratio", "video CPU ms/frame", "alone CPU ms/frame", "CPU ratio"], rows))
    if args.stages:
        print(harness.format_table(["stage", "1 thread: wall ms/frame", "CPU ms/frame",
                                    f"{torch.get_num_threads()} threads: wall ms/frame", "CPU ms/frame"],
                                   stage_times(checkpoint, clip, args.batch_size)))
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
