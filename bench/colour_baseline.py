"""Colour-only baseline: how far does a pixel's RGB value alone go on a dataset?

Fits one mean RGB colour per class on the train split and labels every val pixel with the class
of the nearest mean. On the synthetic city this must stay <= 0.45 mIoU (issue 3): otherwise the
scenes could be solved without spatial context and would not exercise the U-Net.

    python -m bench.colour_baseline --data_root Dataset/synthetic

Measured (seed 0, 300 train / 60 val): 0.093 mIoU at 512x256, 0.097 at 128x64.
"""
import argparse
import sys

import numpy as np
import torch

from dataset import ClassTable, CityscapesLayout, read_image, read_mask
from metrics import ConfusionMatrix


def _pixels(image_path, mask_path, label_to_train):
    """(P, 3) float64 colours and (P,) train ids of one sample's pixels."""
    colors = read_image(image_path).permute(1, 2, 0).reshape(-1, 3).numpy().astype(np.float64)
    return colors, label_to_train[read_mask(mask_path).numpy().reshape(-1)]


def class_means(root, class_table):
    """(C, 3) mean train-split colour per class; NaN rows for classes without pixels."""
    sums = np.zeros((class_table.num_classes, 3))
    counts = np.zeros(class_table.num_classes)
    for image_path, mask_path in CityscapesLayout(root).samples("train"):
        colors, train_ids = _pixels(image_path, mask_path, class_table.label_to_train)
        valid = train_ids < class_table.num_classes
        counts += np.bincount(train_ids[valid], minlength=class_table.num_classes)
        for channel in range(3):
            sums[:, channel] += np.bincount(train_ids[valid], colors[valid, channel], minlength=class_table.num_classes)
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None]


def colour_baseline_miou(root):
    """val mIoU (official 19 classes, void ignored) of the nearest-class-mean RGB classifier fitted on train."""
    class_table = ClassTable.from_names()
    means = class_means(root, class_table)
    seen = np.flatnonzero(~np.isnan(means[:, 0]))
    confusion = ConfusionMatrix(class_table.num_classes)
    for image_path, mask_path in CityscapesLayout(root).samples("val"):
        colors, train_ids = _pixels(image_path, mask_path, class_table.label_to_train)
        distances = ((colors[:, None, :] - means[None, seen, :]) ** 2).sum(-1)
        prediction = seen[distances.argmin(1)]
        confusion.update(torch.from_numpy(prediction), torch.from_numpy(train_ids.astype(np.int64)))
    return confusion.compute()["miou"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", default="Dataset/synthetic", help="Cityscapes-format root with train and val")
    args = parser.parse_args()
    try:
        miou = colour_baseline_miou(args.data_root)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.data_root}: nearest-class-mean RGB baseline val mIoU = {miou:.4f}")


if __name__ == "__main__":
    main()
