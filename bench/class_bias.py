"""Where a trained model's per-class IoU is lost: to the class weights' bias, to the training size, or to the
model's scores themselves. One pass over a labelled split, scored like `inference.py --evaluate` (labels at their
own resolution, logits upsampled bilinearly), prints three things:

- logit adjustment: the IoU after subtracting TAU * log(class weight) from the logits, for each TAU, on top
  of the model's own --logit_adjustment (what training with that flag would have saved; losses.logit_shift)
- labels at the training size and back: the IoU of the labels themselves taken down to the model's
  --image_size and back (nearest), i.e. of a perfect label map at that size scaled up
- separable: per class, the best IoU of thresholding that class's probability alone (a grid of 19
  thresholds): how well the model's scores tell that class from the rest at all

    python -m bench.class_bias --run runs/20261130-092000 --data_root ../shared/camvid --split train
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness
from dataset import resize_mask
from inference import Segmenter, evaluation_split
from losses import logit_shift
from metrics import ConfusionMatrix

THRESHOLDS = torch.linspace(0.05, 0.95, 19)


def class_weights_of(run_dir):
    """(class weights, the logit adjustment the model already has) from a run folder's config.json."""
    for name in ("config.json", "best_model.pth"):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir}: no {name}; --run takes a training run folder after its first evaluation")
    config = json.loads((run_dir / "config.json").read_text())
    if not config.get("class_weight_values"):
        raise ValueError(f"{run_dir / 'config.json'}: this run used no class weights, so there is no bias to take out")
    return torch.tensor(config["class_weight_values"]), config.get("logit_adjustment", 0.0)


@torch.inference_mode()
def sweep(segmenter, dataset, weights, taus):
    """Confusion matrices per extra TAU, of the round trip through the training size, and the per-class
    threshold counts (true positives and false positives per threshold, and true pixels)."""
    num_classes = dataset.class_table.num_classes
    adjusted = {tau: ConfusionMatrix(num_classes) for tau in taus}
    round_trip = ConfusionMatrix(num_classes)
    true_pos = torch.zeros(num_classes, len(THRESHOLDS))
    false_pos = torch.zeros(num_classes, len(THRESHOLDS))
    true_pixels = torch.zeros(num_classes)
    shifts = {tau: logit_shift(weights, tau).view(-1, 1, 1) for tau in taus}
    for index in range(len(dataset)):
        image, target = dataset[index]
        logits = F.interpolate(segmenter.logits(image[None]), size=target.shape, mode="bilinear",
                               align_corners=False)[0].cpu()
        for tau in taus:
            adjusted[tau].update((logits - shifts[tau]).argmax(0), target)
        round_trip.update(resize_mask(resize_mask(target, segmenter.image_size), target.shape[::-1]), target)
        probabilities, valid = logits.softmax(0), target < num_classes
        for label in range(num_classes):
            is_label = target == label
            called = (probabilities[label][None] > THRESHOLDS.view(-1, 1, 1)) & valid
            true_pos[label] += (called & is_label).sum((1, 2))
            false_pos[label] += (called & ~is_label).sum((1, 2))
            true_pixels[label] += is_label.sum()
    separable = (true_pos / (true_pixels[:, None] + false_pos)).max(1).values
    return adjusted, round_trip, separable


def run(args):
    run_dir = Path(args.run)
    weights, trained_tau = class_weights_of(run_dir)
    segmenter = Segmenter(run_dir / "best_model.pth", device=args.device)
    dataset = evaluation_split(argparse.Namespace(data_root=args.data_root, dataset="auto", split=args.split,
                                                  checkpoint=run_dir / "best_model.pth"), segmenter)
    adjusted, round_trip, separable = sweep(segmenter, dataset, weights, args.taus)
    names = dataset.class_table.names

    def row(label, results):
        return [label, f"{results['miou']:.3f}", *(f"{iou:.2f}" for iou in results["iou"].tolist())]

    rows = [row(f"TAU {trained_tau + tau:g}" + (" (as trained)" if tau == 0 else ""), adjusted[tau].compute())
            for tau in args.taus]
    rows.append(row(f"labels at {segmenter.image_size[0]}x{segmenter.image_size[1]} and back",
                    round_trip.compute()))
    rows.append(["separable (best threshold)", f"{separable.nanmean():.3f}", *(f"{v:.2f}" for v in separable.tolist())])
    body = (f"{run_dir}, {args.split} split of {args.data_root} ({len(dataset)} images) at the labels' resolution; "
            f"TAU = total logit adjustment\n\n")
    body += harness.format_table(["what", "mIoU", *names], rows)
    harness.report("class_bias", harness.machine_header(segmenter.device), body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (best_model.pth and config.json)")
    parser.add_argument("--data_root", required=True, help="the labelled data the run trained on")
    parser.add_argument("--split", default="val", help="split to score (default: val)")
    parser.add_argument("--taus", type=float, nargs="+", default=[-0.5, -0.25, 0.0, 0.25, 0.5],
                        help="extra logit adjustments to try, on top of the run's own (default: -0.5 -0.25 0 "
                             "0.25 0.5)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    harness.main(run, parse_args)
