"""Pictures: class palettes, overlays and legends, image | ground truth | prediction grids, and a training
run's figures (loss and mIoU curves, per-class IoU, confusion matrix).

Figures are made with matplotlib's Figure directly, never pyplot: no global state, and they work headless.
"""
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw

from dataset import IGNORE_INDEX
from runtime import save_figure


def _as_numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)


def colorize(mask, colors) -> np.ndarray:
    """Class-id mask (H, W) -> uint8 (H, W, 3) palette image; ignored / unknown ids are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = colors
    return palette[_as_numpy(mask).astype(np.int64).clip(0, 255)]


def overlay(image_uint8, mask, colors, alpha=0.5) -> np.ndarray:
    """Blend the class colours over the image; ignored pixels keep the image, unknown ids blend with black. Integer
    arithmetic in 1/256ths, rounded half to even: float blending's pixels exactly for alphas in 1/256ths (0.5,
    0.25), else within 1. Each (class, channel, value) is blended once into a table the pixels index: video
    overlays every frame, and one table lookup a pixel is the cheapest exact way."""
    image, mask = _as_numpy(image_uint8), _as_numpy(mask)
    table = blend_table(np.asarray(colors, np.uint16).reshape(-1, 3), int(round(alpha * 256)))
    row = blend_rows(mask, len(colors))
    index = row[..., None] + np.arange(3, dtype=row.dtype)
    index <<= 8
    index |= image
    return table[index]


def blend_rows(mask, class_count) -> np.ndarray:
    """Class-id mask -> its pixels' rows of blend_table, as 3 r (add the channel, shift by 8, or in the value): the
    class's own, black's for unknown ids, the image's itself for ignored pixels; in the narrowest type that holds
    the table's indices."""
    index_type = np.uint16 if (class_count + 2) * 3 * 256 <= 2 ** 16 else np.uint32
    rows = np.full(256, 3 * class_count, index_type)
    rows[:class_count] = 3 * np.arange(class_count)
    rows[IGNORE_INDEX] = 3 * (class_count + 1)
    return rows[mask if mask.dtype == np.uint8 else mask.astype(np.int64).clip(0, 255)]


def blend_table(palette, weight, black=(0, 0, 0)) -> np.ndarray:
    """Flat uint8 table of (C + 2) x 3 x 256 blends, row r channel c value v at (3 r + c) * 256 + v: the C colours
    and black at weight / 256 over the value, then the value itself. Any 3-channel space: RGB, or Y, U, V."""
    values = np.arange(256, dtype=np.uint16)
    colours = np.concatenate([palette, np.asarray(black, np.uint16).reshape(1, 3)])
    sum256 = values * (256 - weight) + colours[..., None] * weight
    blended, remainder = sum256 >> 8, sum256 & 255
    blended += (remainder > 128) | ((remainder == 128) & (blended & 1).astype(bool))
    return np.concatenate([blended, np.broadcast_to(values, (1, 3, 256))]).astype(np.uint8).reshape(-1)


def legend_image(class_table, row_height=20, width=200) -> np.ndarray:
    """uint8 (C * row_height, width, 3): one row per class, colour swatch then name."""
    legend = Image.new("RGB", (width, row_height * class_table.num_classes), "white")
    draw = ImageDraw.Draw(legend)
    for class_id, (name, color) in enumerate(zip(class_table.names, class_table.colors)):
        top = class_id * row_height
        draw.rectangle([2, top + 2, 2 * row_height, top + row_height - 3], fill=tuple(int(c) for c in color))
        draw.text((2 * row_height + 6, top + 4), f"{class_id} {name}", fill="black")
    return np.array(legend)


def save_prediction_grid(path, images_uint8, gt_masks, pred_masks, class_table):
    """PNG with one row per sample: image | ground truth | prediction, and a legend of the classes shown."""
    if not len(images_uint8) == len(gt_masks) == len(pred_masks) > 0:
        raise ValueError(f"need equally many images, ground truths and predictions (>0), got "
                         f"{len(images_uint8)}, {len(gt_masks)}, {len(pred_masks)}")
    rows = len(images_uint8)
    height, width = _as_numpy(images_uint8[0]).shape[:2]
    figure = Figure(figsize=(9, 3 * rows * height / width + 1), layout="constrained")
    axes = figure.subplots(rows, 3, squeeze=False)
    shown = set()
    for row, (image, gt, pred) in enumerate(zip(images_uint8, gt_masks, pred_masks)):
        gt, pred = _as_numpy(gt), _as_numpy(pred)
        shown |= set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())
        panels = (_as_numpy(image), colorize(gt, class_table.colors), colorize(pred, class_table.colors))
        for axis, picture, title in zip(axes[row], panels, ("image", "ground truth", "prediction")):
            axis.imshow(picture, interpolation="nearest")
            axis.set_axis_off()
            if row == 0:
                axis.set_title(title)
    handles = [Patch(color=class_table.colors[i] / 255, label=class_table.names[i])
               for i in sorted(shown) if i < class_table.num_classes]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize="small")
    save_figure(figure, path)


def plot_training_curves(records, path):
    """Train and val loss, val mIoU and the learning rate over optimizer steps, from metrics.jsonl's
    records. Every point gets a marker, so a run with a single log point still shows it."""
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "miou" in r]
    figure = Figure(figsize=(15, 4), layout="constrained")
    loss_ax, miou_ax, lr_ax = figure.subplots(1, 3)
    loss_ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], ".-", label="train")
    loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    miou_ax.plot([r["step"] for r in evals], [r["miou"] for r in evals], "o-")
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], ".-")
    for axis, title in ((loss_ax, "loss"), (miou_ax, "val mIoU"), (lr_ax, "learning rate")):
        axis.set(xlabel="optimizer step", title=title)
    loss_ax.legend()
    save_figure(figure, path)


def plot_per_class_iou(evaluation, class_names, path):
    """Horizontal bars of one evaluation record's per-class IoU; undefined classes are hatched n/a bars."""
    ious = [evaluation["per_class_iou"][name] for name in class_names]
    figure = Figure(figsize=(8, 1 + 0.3 * len(class_names)), layout="constrained")
    axis = figure.subplots()
    bars = axis.barh(class_names, [0 if iou is None else iou for iou in ious])
    for bar, iou in zip(bars, ious):
        if iou is None:  # no pixel of the class in ground truth or prediction: undefined, not 0
            bar.set(width=1, facecolor="none", edgecolor="grey", hatch="//")
    axis.bar_label(bars, ["n/a" if iou is None else "" for iou in ious], label_type="center")
    axis.set(xlim=(0, 1), xlabel="IoU", title=f"per-class IoU at step {evaluation['step']}")
    axis.invert_yaxis()
    save_figure(figure, path)


def row_normalized(matrix):
    """Each ground-truth row divided by its pixel count (per-class recall view); rows with no pixels stay
    zero instead of becoming NaN."""
    matrix = torch.as_tensor(matrix).cpu().double().numpy()
    row_sums = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)


def plot_confusion_matrix(matrix, class_names, path):
    """The row-normalised confusion matrix as a PNG."""
    if len(class_names) != len(matrix):
        raise ValueError(f"got {len(class_names)} class names for a {len(matrix)}-class matrix")
    size = 2 + 0.4 * len(class_names)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axis = figure.add_subplot()
    image = axis.imshow(row_normalized(matrix), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axis, label="fraction of ground-truth pixels")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=90)
    axis.set_yticks(ticks, class_names)
    axis.set(xlabel="prediction", ylabel="ground truth")
    save_figure(figure, path)
