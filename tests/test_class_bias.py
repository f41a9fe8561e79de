"""bench/class_bias.py, whose numbers back the camvid preset's --logit_adjustment: its TAU rows against
inference.py --evaluate on models trained with and without the flag, its other two rows recomputed with numpy."""
import argparse
import json

import numpy as np
import pytest

import inference
import training
from bench import class_bias

TINY = ["--image_size", "32x16", "--base_channels", "4", "--depth", "2", "--batch_size", "2", "--accum_steps", "1",
        "--warmup_steps", "1", "--num_workers", "0", "--device", "cpu", "--training_iterations", "3",
        "--class_weights", "auto"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def table_rows(output):
    """{first cell: the other cells} of the markdown table rows in output."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in output.splitlines()
            if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows}


def evaluated_miou(run_dir, data_root, capsys):
    assert inference.main(["--checkpoint", str(run_dir / "best_model.pth"), "--evaluate", "--data_root",
                           str(data_root), "--split", "val", "--output", str(run_dir / "evaluation")]) == 0
    capsys.readouterr()
    return json.loads((run_dir / "evaluation" / "evaluation_val.json").read_text())["miou"]


def numpy_iou(pairs, num_classes):
    """Per-class IoU (NaN where a class is in neither) of (prediction, target) arrays; target 255 = void."""
    tp, fp, fn = (np.zeros(num_classes) for _ in range(3))
    for pred, target in pairs:
        valid = target != 255
        for label in range(num_classes):
            tp[label] += np.sum((pred == label) & (target == label))
            fp[label] += np.sum((pred == label) & (target != label) & valid)
            fn[label] += np.sum((pred != label) & (target == label))
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fp + fn)


def test_tau_rows_are_what_training_with_that_logit_adjustment_evaluates_to(make_cityscapes, tmp_path, capsys):
    city = make_cityscapes(size=(64, 32), counts={"train": 8, "val": 4}, block=3, noise=10)  # labels at 2x the model
    for name, tau in (("plain", "0"), ("adjusted", "0.5")):
        training.main(["--data_root", str(city), "--out_dir", str(tmp_path / name), "--model_path",
                       str(tmp_path / name / "model.pth"), *TINY, "--logit_adjustment", tau])
    capsys.readouterr()
    plain, adjusted = (evaluated_miou(tmp_path / name, city, capsys) for name in ("plain", "adjusted"))
    assert plain != adjusted
    class_bias.run(class_bias.parse_args(["--run", str(tmp_path / "plain"), "--data_root", str(city),
                                          "--taus", "0", "0.5"]))
    rows = table_rows(capsys.readouterr().out)
    assert float(rows["TAU 0 (as trained)"][0]) == pytest.approx(plain, abs=5e-4)
    assert float(rows["TAU 0.5"][0]) == pytest.approx(adjusted, abs=5e-4)  # the flag is the post-hoc shift
    class_bias.run(class_bias.parse_args(["--run", str(tmp_path / "adjusted"), "--data_root", str(city),
                                          "--taus", "-0.5", "0"]))
    rows = table_rows(capsys.readouterr().out)
    assert float(rows["TAU 0.5 (as trained)"][0]) == pytest.approx(adjusted, abs=5e-4)
    assert float(rows["TAU 0"][0]) == pytest.approx(plain, abs=5e-4)

    segmenter = inference.Segmenter(tmp_path / "adjusted" / "best_model.pth", device="cpu")
    dataset = inference.evaluation_split(argparse.Namespace(data_root=city, dataset="auto", split="val",
                                                            checkpoint=None), segmenter)
    targets = [dataset[index][1].numpy() for index in range(len(dataset))]
    assert targets[0].shape == (32, 64)
    # nearest down to 32x16 keeps every second pixel (pixel centres: 1, 3, ...), and back up repeats each twice
    num_classes = len(dataset.class_table.names)
    round_trip = numpy_iou([(t[1::2, 1::2].repeat(2, 0).repeat(2, 1), t) for t in targets], num_classes)
    assert 0.3 < np.nanmean(round_trip) < 0.99  # 3-pixel blocks: the round trip moves some edges
    assert float(rows["labels at 32x16 and back"][0]) == pytest.approx(np.nanmean(round_trip), abs=5e-4)
    # separable: the best of 19 thresholds on each class's own probability, from Segmenter's probabilities
    probabilities = [segmenter(photo, probabilities=True)[1] for photo, _ in dataset.samples]
    best = np.full(num_classes, np.nan)
    for threshold in np.linspace(0.05, 0.95, 19):
        pairs = [(np.where(p > threshold, np.arange(num_classes)[:, None, None], -1), t) for p, t in
                 zip(probabilities, targets)]
        for label in range(num_classes):
            called = [(pred[label], t) for pred, t in pairs]
            iou = numpy_iou(called, num_classes)[label]
            best[label] = iou if np.isnan(best[label]) else max(best[label], np.nan_to_num(iou))
    separable = [float(cell) for cell in rows["separable (best threshold)"][1:]]
    np.testing.assert_allclose(separable, np.round(best, 2), atol=0.011)
    assert np.nanmax(best) > 0.05  # not all zeros, so the comparison above tells something


def test_a_folder_that_is_no_run_or_a_run_without_class_weights_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json; --run takes a training run folder"):
        class_bias.class_weights_of(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"class_weights": "none", "class_weight_values": None}))
    with pytest.raises(ValueError, match="no best_model.pth; --run takes a training run folder"):
        class_bias.class_weights_of(tmp_path)
    (tmp_path / "best_model.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="used no class weights"):
        class_bias.class_weights_of(tmp_path)
