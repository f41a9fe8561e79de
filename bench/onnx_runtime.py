"""CPU inference through PyTorch and ONNX Runtime, float32 and int8: photos per second of the model alone and end to
end through inference.py, with the share of the end-to-end time that is not the model.

    python -m bench.onnx_runtime --data_root ../shared/camvid --checkpoint runs/camvid/best_model.pth --record
    python -m bench.onnx_runtime --checkpoint M.pth --data_root A --evaluate_on A B   # mIoU on the val of A and B
    python -m bench.onnx_runtime                 # the camvid preset's architecture, random weights, noise photos

Candidates, timed round-robin in one run (medians): PyTorch eager float32 (inference.py's CPU default), PyTorch
bf16 autocast (only where the CPU computes bf16 natively; elsewhere it is emulated and skipped), ONNX Runtime
float32 (inference.py --export) and ONNX Runtime int8 (--export --int8, calibrated on up to 100 train photos of
--data_root, or on the noise photos without one). Model alone: batches of 1 and 8 at the training size. End to end:
inference.predict on a folder of --num_photos 480x360 photos (decode, resize, model, upsample, argmax, three files
written). The breakdown times each stage of one photo with the PyTorch float32 model. Accuracy: each candidate's
inference.py --evaluate on the val split of every --evaluate_on dataset, against PyTorch float32's.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

import inference
from bench import harness
from config import REAL_PHOTOS
from dataset import CAMVID_CLASSES, MEAN, STD, open_layout, read_photo
from onnx_runtime import calibration_photos, export_onnx, quantize_int8
from runtime import cpu_has_native_bf16, parse_size
from unet import UNet, save_weights, upsample_argmax

BENCH_OUT = Path(__file__).resolve().parent / "out" / "onnx_runtime"
PHOTO_SIZE = (480, 360)  # CamVid's


def random_weights():
    """The camvid preset's model (architecture and training size) with random weights: speed ignores the values."""
    torch.manual_seed(0)
    model = UNet(3, len(CAMVID_CLASSES), REAL_PHOTOS["base_channels"], REAL_PHOTOS["depth"],
                 bilinear=REAL_PHOTOS["bilinear"])
    path = BENCH_OUT / "camvid_random.pth"
    save_weights(path, model, class_names=[name for name, _, _ in CAMVID_CLASSES],
                 class_colors=[color for _, _, color in CAMVID_CLASSES], image_size=parse_size(REAL_PHOTOS["image_size"]),
                 mean=MEAN, std=STD, dataset="camvid")
    return path


def photo_folder(args):
    """A folder of --num_photos 480x360 photos: links to the val photos of --data_root, or smooth noise."""
    folder = BENCH_OUT / "photos"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if args.data_root:
        for image, _ in open_layout(args.data_root).samples("val")[: args.num_photos]:
            (folder / image.name).symlink_to(image.resolve())
        return folder
    rng = np.random.default_rng(0)
    for index in range(args.num_photos):
        small = rng.integers(0, 256, (PHOTO_SIZE[1] // 8, PHOTO_SIZE[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(PHOTO_SIZE, Image.BILINEAR).save(folder / f"photo{index:03d}.jpg", quality=90)
    return folder


def segmenters(args, checkpoint, photos):
    """{name: Segmenter} of the candidates; the ONNX files are exported from `checkpoint` first."""
    torch_model = inference.Segmenter(checkpoint, device="cpu", amp="off")
    float_path, int8_path = BENCH_OUT / "model.onnx", BENCH_OUT / "model_int8.onnx"
    export_onnx(torch_model, float_path)
    calibration = calibration_photos(args.data_root, torch_model.image_size, torch_model.mean, torch_model.std) \
        if args.data_root else [torch_model.model_input(read_photo(path))[None].numpy() for path in photos]
    int8 = quantize_int8(onnx.load(float_path), calibration)
    int8_path.write_bytes(int8.SerializeToString())
    candidates = {"PyTorch float32": torch_model}
    if cpu_has_native_bf16():
        candidates["PyTorch bf16 autocast"] = inference.Segmenter(checkpoint, device="cpu", amp="bf16")
    else:
        print("PyTorch bf16 autocast: skipped, this CPU has no native bf16 (AVX512-BF16 or AMX); emulated bf16 is "
              "slower than float32 and says nothing about a bf16 CPU")
    candidates["ONNX Runtime float32"] = inference.Segmenter(float_path)
    candidates["ONNX Runtime int8"] = inference.Segmenter(int8_path)
    return candidates


def model_alone(args, candidates, inputs):
    """{name: (photos/s at batch 1, at batch 8)}."""
    runs = {}
    for name, segmenter in candidates.items():
        runs[(name, 1)] = lambda segmenter=segmenter: segmenter.logits(inputs[:1])
        runs[(name, 8)] = lambda segmenter=segmenter: segmenter.logits(inputs)
    times = harness.interleaved_times(runs, args.repeats, torch.device("cpu"))
    return {name: (1 / harness.median(times[(name, 1)]), 8 / harness.median(times[(name, 8)])) for name in candidates}


def end_to_end(args, candidates, folder):
    """{name: photos/s} of inference.predict on the folder, with inference.py's defaults but --num_workers."""
    runs = {name: lambda name=name: inference.predict(inference.parse_args(
        ["--input", str(folder), "--output", str(BENCH_OUT / f"masks_{index}"), "--num_workers", str(args.num_workers)]),
        candidates[name]) for index, name in enumerate(candidates)}
    times = harness.interleaved_times(runs, args.e2e_repeats, torch.device("cpu"))
    count = len(list(folder.iterdir()))
    return {name: count / harness.median(times[name]) for name in candidates}


def stages(segmenter, path, repeats):
    """{stage: seconds} for one photo, each stage alone, in inference.py's order (median of `repeats`)."""
    photo = read_photo(path)
    model_input = segmenter.model_input(photo)[None]
    logits = segmenter.logits(model_input)[0]
    mask = upsample_argmax(logits, photo.shape[:2]).byte().numpy()
    table, values = segmenter.class_table, np.arange(256, dtype=np.uint8)
    out = BENCH_OUT / "stages"
    runs = {"decode": lambda: read_photo(path), "resize + normalise": lambda: segmenter.model_input(photo),
            "model (batch 1)": lambda: segmenter.logits(model_input),
            "upsample + argmax": lambda: upsample_argmax(logits, photo.shape[:2]),
            "write mask, colour, overlay": lambda: inference.write_prediction(photo, mask, out, "x", table, values, 0.5)}
    times = harness.interleaved_times(runs, repeats, torch.device("cpu"))
    return {name: harness.median(values) for name, values in times.items()}


def operator_profile(path, inputs, runs=5):
    """ONNX Runtime's own profile of `runs` calls on inputs: {operator type: share of the node time}, largest first."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(BENCH_OUT / "profile")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(["logits"], {"image": inputs.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            operator = event["args"]["op_name"]
            totals[operator] = totals.get(operator, 0) + event["dur"]
    total = sum(totals.values())
    return {operator: time / total for operator, time in sorted(totals.items(), key=lambda item: -item[1])}


def agreement(candidates, photos):
    """{name: share of the photos' pixels whose class is PyTorch float32's} (Segmenter's masks)."""
    reference = [candidates["PyTorch float32"](path) for path in photos]
    return {name: sum(int((segmenter(path) == mask).sum()) for path, mask in zip(photos, reference))
            / sum(mask.size for mask in reference) for name, segmenter in candidates.items()}


def accuracy(args, candidates, root):
    """{name: inference.py --evaluate's report} of each candidate on the val split of root."""
    reports = {}
    for index, (name, segmenter) in enumerate(candidates.items()):
        output = BENCH_OUT / f"evaluation_{index}"
        inference.evaluate_split(inference.parse_args(["--evaluate", "--data_root", str(root), "--output", str(output),
                                                       "--num_workers", str(args.num_workers)]), segmenter)
        reports[name] = json.loads((output / "evaluation_val.json").read_text())
    return reports


def accuracy_table(args, candidates):
    """Markdown: val mIoU of each candidate on each --evaluate_on root, and its largest per-class IoU loss."""
    reference, rows = "PyTorch float32", {name: [name] for name in candidates}
    header = ["candidate"]
    for root in args.evaluate_on:
        reports = accuracy(args, candidates, root)
        header += [f"val mIoU {Path(root).name}", "vs PyTorch", "largest class loss"]
        base = reports[reference]
        for name, report in reports.items():
            losses = {cls: base["per_class"][cls]["iou"] - iou["iou"] for cls, iou in report["per_class"].items()
                      if iou["iou"] is not None and base["per_class"][cls]["iou"] is not None}
            worst = max(losses, key=losses.get)
            rows[name] += [f"{report['miou']:.4f}", f"{report['miou'] - base['miou']:+.4f}",
                           f"{worst} {-losses[worst]:+.4f}" if losses[worst] > 0 else "none"]
    return harness.format_table(header, list(rows.values()))


def run(args):
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (f"{harness.machine_header(device)}, "
              f"{'native bf16' if cpu_has_native_bf16() else 'no native bf16'}, onnxruntime "
              f"{__import__('onnxruntime').__version__}")
    print(header)
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or random_weights()
    folder = photo_folder(args)
    photos = sorted(folder.iterdir())
    candidates = segmenters(args, checkpoint, photos)
    base = candidates["PyTorch float32"]
    inputs = torch.stack([base.model_input(read_photo(path)) for path in photos[:8]])
    alone = model_alone(args, candidates, inputs)
    whole = end_to_end(args, candidates, folder)
    reference = "PyTorch float32"
    rows = [[name, f"{b1:.2f}", f"{b1 / alone[reference][0]:.2f}x", f"{b8:.2f}", f"{b8 / alone[reference][1]:.2f}x",
             f"{whole[name]:.2f}", f"{whole[name] / whole[reference]:.2f}x", f"{1 - whole[name] / b8:.0%}"]
            for name, (b1, b8) in alone.items()]
    stage_times = stages(base, photos[0], args.repeats)
    total = sum(stage_times.values())
    body = (f"{checkpoint if args.checkpoint else 'the camvid preset architecture, random weights'} at "
            f"{base.image_size[0]}x{base.image_size[1]}; {len(photos)} {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} photos "
            f"({'val of ' + str(args.data_root) if args.data_root else 'noise'}); model alone: median of "
            f"{args.repeats} interleaved calls; end to end: inference.py on the folder (batches of 8, "
            f"{args.num_workers} decoding worker, 2 writer threads), median of {args.e2e_repeats} runs; not the "
            f"model: 1 - end-to-end time / (model time at batch 8)\n\n"
            + harness.format_table(["candidate", "model b1 photos/s", "b1 vs PyTorch", "model b8 photos/s",
                                    "b8 vs PyTorch", "end to end photos/s", "end to end vs PyTorch",
                                    "end to end not the model"], rows)
            + "\n\none photo, each stage alone (PyTorch float32, ms): "
            + ", ".join(f"{name} {1000 * seconds:.1f} ({seconds / total:.0%})" for name, seconds in stage_times.items()))
    for name in ("ONNX Runtime float32", "ONNX Runtime int8"):
        shares = operator_profile(candidates[name].path, inputs[:1])
        body += (f"\n\n{name}, batch 1, ONNX Runtime's profile (share of the operator time): "
                 + ", ".join(f"{operator} {share:.0%}" for operator, share in list(shares.items())[:8]))
    same = agreement(candidates, photos)
    body += (f"\n\nsame class as PyTorch float32 on the {len(photos)} photos' pixels: "
             + ", ".join(f"{name} {share:.3%}" for name, share in same.items()))
    if args.evaluate_on:
        body += "\n\n" + accuracy_table(args, candidates)
    harness.report("onnx_runtime", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a weights file of training.py (default: the camvid preset's "
                                             "architecture with random weights)")
    parser.add_argument("--data_root", help="CamVid (or any layout): val photos to segment, train photos to "
                                            "calibrate int8 (default: 480x360 noise photos)")
    parser.add_argument("--evaluate_on", nargs="*", help="labelled datasets whose val split each candidate scores "
                                                         "with inference.py --evaluate (default: --data_root)")
    parser.add_argument("--num_photos", type=int, default=32, help="photos in the end-to-end folder (default: 32)")
    parser.add_argument("--num_workers", type=int, default=1, help="inference.py decoding workers (default: 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of the model per case (default: 10)")
    parser.add_argument("--e2e_repeats", type=int, default=3, help="timed end-to-end runs per case (default: 3)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--record", action="store_true",
                        help="append the results to bench/records/DATE-onnx-runtime.md (default: print only)")
    args = parser.parse_args(argv)
    if args.evaluate_on is None:
        args.evaluate_on = [args.data_root] if args.data_root else []
    if min(args.num_photos, args.repeats, args.e2e_repeats) < 1 or args.num_workers < 0:
        parser.error("--num_photos, --repeats and --e2e_repeats must be >= 1, --num_workers >= 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
