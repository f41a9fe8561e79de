import copy
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import Cityscapes

from metrics import ConfusionMatrix, format_table
from visualize import plot_confusion_matrix, row_normalized

# Hand example, 4 classes, 12 pixels: class 3 appears nowhere; 7 is an out-of-range
# prediction ("other"); the last three pixels are ignored and predicted as real classes.
HAND_TARGET = [0, 0, 0, 0, 1, 1, 1, 2, 2, 255, 255, 255]
HAND_PRED = [0, 0, 0, 1, 1, 1, 0, 2, 7, 1, 2, 0]
# rows gt, cols pred: gt0 -> 3x0, 1x1; gt1 -> 2x1, 1x0; gt2 -> 1x2, 1xother
# TP = [3, 2, 1, 0], FP = [1, 1, 0, 0], FN = [1, 1, 1, 0]


def hand_matrix(pred=HAND_PRED, target=HAND_TARGET, dtype=torch.int64):
    metric = ConfusionMatrix(4)
    metric.update(torch.tensor(pred, dtype=dtype).view(1, 3, 4), torch.tensor(target, dtype=dtype).view(1, 3, 4))
    return metric


def test_hand_computed_example():
    metric = hand_matrix()
    assert metric.matrix.dtype == torch.int64
    assert metric.matrix.tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    results = metric.compute()
    assert results["iou"].dtype == torch.float64
    torch.testing.assert_close(results["iou"], torch.tensor([3 / 5, 2 / 4, 1 / 2, math.nan], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(results["dice"], torch.tensor([6 / 8, 4 / 6, 2 / 3, math.nan], dtype=torch.float64),
                               equal_nan=True)
    assert results["miou"] == pytest.approx((3 / 5 + 1 / 2 + 1 / 2) / 3, abs=1e-12)  # NaN class left out
    assert results["fwiou"] == pytest.approx((4 * 3 / 5 + 3 * 1 / 2 + 2 * 1 / 2) / 9, abs=1e-12)
    assert results["pixel_acc"] == pytest.approx(6 / 9, abs=1e-12)
    assert results["mean_acc"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 2) / 3, abs=1e-12)
    assert all(isinstance(results[key], float) for key in ("miou", "fwiou", "pixel_acc", "mean_acc"))


def test_predictions_at_ignored_pixels_count_nowhere():
    reference = hand_matrix()
    changed_pred = HAND_PRED[:9] + [3, 3, 3]  # class 3 predicted only where the target is ignored
    changed = hand_matrix(pred=changed_pred)
    assert torch.equal(changed.matrix, reference.matrix)
    assert math.isnan(changed.compute()["iou"][3])  # not a false positive of class 3
    out_of_range_target = hand_matrix(target=HAND_TARGET[:9] + [4, -1, 100])
    assert torch.equal(out_of_range_target.matrix, reference.matrix)
    in_range_ignore = ConfusionMatrix(3, ignore_index=0)
    in_range_ignore.update(torch.tensor([1, 2, 1]), torch.tensor([0, 0, 1]))
    assert in_range_ignore.matrix.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_out_of_range_predictions_are_false_negatives_only():
    metric = ConfusionMatrix(2)
    metric.update(torch.tensor([[5, -3, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    assert metric.matrix.tolist() == [[0, 0], [0, 2]]
    results = metric.compute()
    assert results["iou"].tolist() == [0.0, 1.0]
    assert results["pixel_acc"] == 0.5


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_integer_dtypes_agree(dtype):
    pred = [p if 0 <= p < 256 else 0 for p in HAND_PRED]
    assert torch.equal(hand_matrix(pred=pred, dtype=dtype).matrix, hand_matrix(pred=pred).matrix)


def test_bad_inputs_raise_clear_errors():
    metric = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="argmax"):
        metric.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="class names"):
        format_table(hand_matrix().compute(), ["a", "b"])


def test_batches_accumulate_like_one_update_and_reset():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (6, 9, 11), generator=generator)
    target[target == 5] = 255
    pred = torch.randint(-1, 6, (6, 9, 11), generator=generator)
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    batched = ConfusionMatrix(5)
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        batched.update(pred[start:stop], target[start:stop])
    assert torch.equal(batched.matrix, whole.matrix)
    assert batched.matrix.sum() == ((target != 255) & (pred >= 0) & (pred < 5)).sum()
    torch.testing.assert_close(batched.compute()["iou"], whole.compute()["iou"], equal_nan=True)


def test_mean_of_per_batch_miou_is_inflated():
    # Batch 1: easy, class 1 absent. Batch 2: the single class-1 pixel is missed.
    targets = [torch.zeros(1, 10, 10, dtype=torch.int64), torch.zeros(1, 10, 10, dtype=torch.int64)]
    targets[1][0, 0, 0] = 1
    preds = [torch.zeros(1, 10, 10, dtype=torch.int64)] * 2
    per_batch, accumulated = [], ConfusionMatrix(2)
    for pred, target in zip(preds, targets):
        batch = ConfusionMatrix(2)
        batch.update(pred, target)
        per_batch.append(batch.compute()["miou"])
        accumulated.update(pred, target)
    assert per_batch == pytest.approx([1.0, (99 / 100 + 0) / 2])
    assert sum(per_batch) / 2 == pytest.approx(0.7475)
    assert accumulated.compute()["miou"] == pytest.approx((199 / 200 + 0) / 2)  # 0.4975


def test_all_reduce_without_distributed_is_a_no_op():
    metric = hand_matrix()
    before = metric.matrix
    metric.all_reduce()
    assert torch.equal(metric.matrix, before)


def test_all_reduce_with_an_initialised_process_group(tmp_path):
    # One gloo rank in-process: checks the distributed path runs on the int64 buffer
    # (a 2-process spawn proves the sum too but costs ~10 s of imports on 2 cores).
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        metric = hand_matrix()
        metric.all_reduce()
    finally:
        torch.distributed.destroy_process_group()
    assert torch.equal(metric.matrix, hand_matrix().matrix)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_on_cuda_does_not_sync():
    metric = ConfusionMatrix(19, device="cuda")
    pred = torch.randint(0, 30, (2, 64, 128), device="cuda")
    target = torch.randint(0, 19, (2, 64, 128), device="cuda", dtype=torch.uint8)
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metric.matrix.sum().item() + (pred >= 19).sum().item() == pred.numel()


def test_format_table():
    results = hand_matrix().compute()
    table = format_table(results, ["road", "sidewalk", "building", "wall"])
    lines = table.splitlines()
    assert lines[1].split() == ["road", "0.6000", "0.7500"]
    assert lines[3].split() == ["building", "0.5000", "0.6667"]
    assert lines[4].split() == ["wall", "n/a", "n/a"]
    assert len({len(line) for line in lines[:5]}) == 1  # aligned columns
    assert f"{(0.6 + 0.5 + 0.5) / 3:.4f}" in lines[5] and lines[5].startswith("mIoU")
    assert lines[6].startswith("fwIoU") and f"{4.9 / 9:.4f}" in lines[6]
    assert lines[7].startswith("pixel acc") and "0.6667" in lines[7]
    assert lines[8].startswith("mean acc") and f"{23 / 36:.4f}" in lines[8]


def test_row_normalized_and_plot(tmp_path):
    matrix = hand_matrix().matrix
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalized = row_normalized(matrix)
        path = tmp_path / "confusion.png"
        plot_confusion_matrix(matrix, ["road", "sidewalk", "building", "wall"], path)
    np.testing.assert_allclose(normalized, [[3 / 4, 1 / 4, 0, 0], [1 / 3, 2 / 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def label_to_train_lut():
    """Cityscapes label id -> train id, straight from torchvision's table (void -> 255)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for cls in Cityscapes.classes:
        if cls.id >= 0 and cls.train_id not in (-1, 255):
            lut[cls.id] = cls.train_id
    return lut


def test_agrees_with_official_cityscapes_evaluation(tmp_path):
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    rng = np.random.default_rng(0)
    eval_classes = sorted((c for c in Cityscapes.classes if not c.ignore_in_eval), key=lambda c: c.train_id)
    void_ids = [c.id for c in Cityscapes.classes if c.ignore_in_eval and c.id >= 0]
    gt_files, pred_files = [], []
    for index in range(4):
        # 32x64 label ids in 4x4 blocks (all 34 ids appear), then per-pixel corruptions of
        # which many are void ids, so predictions of ignored classes are exercised.
        blocks = rng.permutation(np.resize(np.arange(34, dtype=np.uint8), 8 * 16))
        gt = np.kron(blocks.reshape(8, 16), np.ones((4, 4), dtype=np.uint8))
        pred = gt.copy()
        corrupt = rng.random(gt.shape) < 0.3
        pred[corrupt] = rng.integers(0, 34, corrupt.sum())
        pred[rng.random(gt.shape) < 0.05] = rng.choice(void_ids)
        stem = f"frankfurt_{index:06d}_000019"
        gt_files.append(str(tmp_path / f"{stem}_gtFine_labelIds.png"))
        pred_files.append(str(tmp_path / f"{stem}_pred.png"))
        Image.fromarray(gt).save(gt_files[-1])
        Image.fromarray(pred).save(pred_files[-1])

    args = copy.copy(evaluation.args)  # the module-level args object must stay untouched
    args.evalInstLevelScore = False  # instance scores use np.in1d, gone in numpy 2.x
    args.quiet = True
    args.JSONOutput = False
    args.exportFile = str(tmp_path / "result.json")
    official = evaluation.evaluateImgLists(pred_files, gt_files, args)

    lut = torch.from_numpy(label_to_train_lut()).long()
    metric = ConfusionMatrix(19)
    for gt_file, pred_file in zip(gt_files, pred_files):
        gt = torch.from_numpy(np.array(Image.open(gt_file))).long()
        pred = torch.from_numpy(np.array(Image.open(pred_file))).long()
        metric.update(lut[pred][None], lut[gt][None])
    ours = metric.compute()

    official_iou = torch.tensor([official["classScores"][c.name] for c in eval_classes], dtype=torch.float64)
    torch.testing.assert_close(ours["iou"], official_iou, atol=1e-6, rtol=0)
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-6)

    # Pixel counting: official rows/columns of the 19 classes are our matrix, and the
    # official row sums (void predictions included) are our per-class ground-truth counts.
    confusion = np.array(official["confMatrix"], dtype=np.int64)
    ids = [c.id for c in eval_classes]
    assert confusion[np.ix_(ids, void_ids)].sum() > 100  # void ids predicted on real classes
    assert confusion[np.ix_(void_ids, ids)].sum() > 100  # real classes predicted on void pixels
    assert metric.matrix.tolist() == confusion[np.ix_(ids, ids)].tolist()
    gt_pixels = confusion[ids].sum(1)
    true_pos = confusion[ids, ids]
    assert ours["pixel_acc"] == pytest.approx(true_pos.sum() / gt_pixels.sum(), abs=1e-12)
    assert ours["mean_acc"] == pytest.approx(np.mean(true_pos / gt_pixels), abs=1e-12)
    dice = 2 * true_pos / (gt_pixels + confusion[np.ix_(ids, ids)].sum(0))
    np.testing.assert_allclose(ours["dice"].numpy(), dice, atol=1e-12)
