"""bench/class_bias.py, whose numbers back the camvid preset's --logit_adjustment: its TAU rows against
inference.py --evaluate on models trained with and without the flag, its resolution ceiling by hand."""
import json

import pytest

import inference
import training
from bench import class_bias

TINY = ["--image_size", "32x16", "--base_channels", "4", "--depth", "2", "--batch_size", "2", "--accum_steps", "1",
        "--warmup_steps", "1", "--num_workers", "0", "--device", "cpu", "--training_iterations", "3",
        "--class_weights", "auto"]


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_tau_rows_are_what_training_with_that_logit_adjustment_evaluates_to(make_cityscapes, tmp_path, capsys):
    city = make_cityscapes(size=(32, 16), counts={"train": 8, "val": 4}, block=4, noise=10)
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
    # labels at the model's own size (32x16) survive the round trip exactly; separable IoU is a fraction
    assert rows["labels at 32x16 and back"][0] == "1.000"
    assert all(0 <= float(cell) <= 1 for cell in rows["separable (best threshold)"] if cell != "nan")


def test_a_run_without_class_weights_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"class_weights": "none", "class_weight_values": None}))
    with pytest.raises(ValueError, match="used no class weights"):
        class_bias.class_weights_of(tmp_path)
