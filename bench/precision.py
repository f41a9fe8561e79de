"""Inference in float32 against bf16 autocast on the CPU: speed, pixel agreement and mIoU of one checkpoint.

    python -m bench.precision --checkpoint unet_model.pth --data_root ../shared/camvid --split val --record

For each precision (inference.py --amp off and --amp bf16): photos per second of the model alone (batches of 1
and 8 at the training size) and end to end through inference.py on --num_photos of the split's photos (decode,
resize, model, upsample, argmax, three files written); the split's mIoU through inference.py --evaluate; and the
share of the split's pixels whose class is the same in both precisions. bf16 is fast only where the CPU computes
it natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, with bf16's rounding of inputs and weights, so
agreement and mIoU carry over to a native-bf16 CPU up to the last bits of its sums, and the speeds do not.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

import inference
from bench import harness
from dataset import open_layout, read_photo
from runtime import cpu_has_native_bf16

BENCH_OUT = Path(__file__).resolve().parent / "out" / "precision"
PRECISIONS = ("off", "bf16")


def split_photos(args):
    """The split's photo paths, and a folder holding links to the first --num_photos of them."""
    paths = [image for image, _ in open_layout(args.data_root).samples(args.split)]
    folder = BENCH_OUT / "photos"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in paths[: args.num_photos]:
        (folder / path.name).symlink_to(path.resolve())
    return paths, folder


def inference_args(args, amp, *extra):
    return inference.parse_args(["--checkpoint", str(args.checkpoint), "--device", "cpu", "--amp", amp,
                                 "--num_workers", str(args.num_workers), *extra])


def speeds(args, segmenters, folder, paths):
    """{amp: (model alone photos/s at batch 1, at batch 8, end to end photos/s)}, timed round-robin."""
    inputs = torch.stack([segmenters["off"].model_input(read_photo(path)) for path in paths[:8]])
    candidates = {}
    for amp, segmenter in segmenters.items():
        candidates[(amp, 1)] = lambda segmenter=segmenter: segmenter.logits(inputs[:1])
        candidates[(amp, 8)] = lambda segmenter=segmenter: segmenter.logits(inputs)
    model_times = harness.interleaved_times(candidates, args.repeats, torch.device("cpu"))
    folder_runs = {amp: lambda amp=amp: inference.predict(
        inference_args(args, amp, "--input", str(folder), "--output", str(BENCH_OUT / f"masks_{amp}")), segmenters[amp])
        for amp in segmenters}
    folder_times = harness.interleaved_times(folder_runs, max(1, args.repeats // 5), torch.device("cpu"))
    count = len(list(folder.iterdir()))
    return {amp: (1 / harness.median(model_times[(amp, 1)]), 8 / harness.median(model_times[(amp, 8)]),
                  count / harness.median(folder_times[amp])) for amp in segmenters}


def agreement(segmenters, paths):
    """Share of the split's pixels that get the same class in both precisions."""
    same = total = 0
    for path in paths:
        masks = [segmenter(path) for segmenter in segmenters.values()]
        same, total = same + int((masks[0] == masks[1]).sum()), total + masks[0].size
    return same / total


def miou(args, amp, segmenter):
    output = BENCH_OUT / f"evaluation_{amp}"
    inference.evaluate_split(inference_args(args, amp, "--evaluate", "--data_root", str(args.data_root), "--split",
                                            args.split, "--output", str(output)), segmenter)
    return json.loads((output / f"evaluation_{args.split}.json").read_text())["miou"]


def run(args):
    device = torch.device("cpu")
    header = (f"{harness.machine_header(device)}, "
              f"{'native bf16' if cpu_has_native_bf16() else 'no native bf16 (emulated: its speeds are not a bf16 CPU’s)'}")
    print(header)
    segmenters = {amp: inference.Segmenter(args.checkpoint, device="cpu", amp=amp) for amp in PRECISIONS}
    paths, folder = split_photos(args)
    rates = speeds(args, segmenters, folder, paths)
    same = agreement(segmenters, paths)
    scores = {amp: miou(args, amp, segmenter) for amp, segmenter in segmenters.items()}
    rows = [[{"off": "float32", "bf16": "bf16 autocast"}[amp], f"{b1:.2f}", f"{b8:.2f}", f"{end:.2f}",
             f"{end / rates['off'][2]:.2f}x", f"{scores[amp]:.4f}"] for amp, (b1, b8, end) in rates.items()]
    body = (f"{args.checkpoint} on {args.data_root} {args.split} ({len(paths)} photos); model alone at the training "
            f"size, median of {args.repeats} interleaved calls; end to end: inference.py on {len(list(folder.iterdir()))} "
            f"photos, {args.num_workers} decoding workers\n\n"
            + harness.format_table(["precision", "model b1 photos/s", "model b8 photos/s", "end to end photos/s",
                                    "end to end vs float32", f"{args.split} mIoU"], rows)
            + f"\n\nsame class in both precisions: {same:.2%} of the {args.split} pixels")
    harness.report("precision", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a weights file of training.py")
    parser.add_argument("--data_root", required=True, help="a labelled dataset (CamVid, Cityscapes, folder layout)")
    parser.add_argument("--split", default="val", help="the labelled split (default: val)")
    parser.add_argument("--num_photos", type=int, default=32, help="photos in the end-to-end folder (default: 32)")
    parser.add_argument("--num_workers", type=int, default=1, help="inference.py decoding workers (default: 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of the model per case (default: 10)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if min(args.num_photos, args.repeats) < 1 or args.num_workers < 0:
        parser.error("--num_photos and --repeats must be >= 1, --num_workers >= 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
