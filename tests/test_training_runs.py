"""training.py end to end on tiny models: files and values a run leaves, exact resume after SIGKILL,
Ctrl-C, non-finite steps, DDP (2 CPU processes, gloo) against 1 process, the loss options, the time budget, and
one-line errors for bad paths and data files."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.datasets import Cityscapes

import batches
import synthetic_city
import training
import visualize
import losses
from config import PRESETS, TrainConfig
import dataset
from dataset import ClassTable, SegmentationDataset
from losses import CEDiceLoss, median_frequency_weights
from lr_schedule import lr_at
from unet import UNet, load_weights
from conftest import TINY, load, records, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
INFERENCE_KEYS = {"model", "model_config", "class_names", "class_colors", "image_size", "mean", "std", "dataset",
                  "torch_version"}
DEFAULTS = TrainConfig()
DEMO = PRESETS["synthetic"].settings


class NaNLoss(CEDiceLoss):
    """CEDiceLoss returning NaN on the training calls listed in `bad_calls` (None = all)."""
    calls = 0
    bad_calls = None

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        if torch.is_grad_enabled():
            NaNLoss.calls += 1
            if NaNLoss.bad_calls is None or NaNLoss.calls in NaNLoss.bad_calls:
                return loss * float("nan")
        return loss


def start_training(args, log_path, new_session=False):
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "training.py", *args], cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=new_session)


def test_bad_path_or_data_file_is_a_one_line_error(city, tmp_path, capsys):
    """Folders that cannot be made fail before any training; a bad mask read by a DataLoader worker (whose
    re-raise carries the worker's traceback) fails with the mask's own message."""
    def error_lines(*flags):
        with pytest.raises(SystemExit) as exit_info:
            training.main(["--data_root", str(city), *TINY, "--num_workers", "1", "--training_iterations", "4", *flags])
        assert exit_info.value.code == 2
        stderr = capsys.readouterr().err
        return [line for line in stderr.splitlines() if line and "step/s" not in line]  # tqdm's bar aside

    blocker, run_dir, model_path = tmp_path / "blocker", tmp_path / "run", tmp_path / "model.pth"
    blocker.write_text("a regular file")
    assert error_lines("--out_dir", str(blocker), "--model_path", str(model_path)) == [f"error: {blocker}: File exists"]
    assert error_lines("--out_dir", str(run_dir), "--model_path", str(blocker / "sub" / "model.pth")) == [
        f"error: {blocker / 'sub'}: Not a directory"]
    assert not run_dir.exists()  # --model_path's folder is made first

    mask_path = sorted((city / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))[3]
    Image.fromarray(np.full((16, 32), 200, np.uint8)).save(mask_path)
    [line] = error_lines("--out_dir", str(run_dir), "--model_path", str(model_path))
    assert line.startswith(f"error: {mask_path}: invalid mask values [200], expected ")
    assert not model_path.exists() and not (run_dir / "checkpoint.pt").exists()


def test_run_leaves_config_metrics_checkpoints_plots(city, tmp_path):
    run_dir = tmp_path / "run"
    training.main(tiny_args(city, run_dir, "--training_iterations", "4", "--eval_interval", "2",
                            "--save_model_interval", "2", "--dice_weight", "0.5"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "cityscapes" and config["image_size"] == "32x16" and config["dice_weight"] == 0.5
    assert config["base_lr"] == DEFAULTS.base_lr  # Cityscapes defaults, not the demo's
    assert config["decay_factor"] == DEFAULTS.decay_factor and config["preset"] == "cityscapes"

    train, evals = records(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"step", "epoch", "train_loss", "lr", "grad_norm", "img_per_s", "nonfinite_steps"} <= set(train[0])
    expected_lrs = [lr_at(s, config["base_lr"], 1, config["decay_factor"], config["min_lr"]) for s in range(4)]
    assert [r["lr"] for r in train] == pytest.approx(expected_lrs, rel=1e-12)
    assert [r["epoch"] for r in train] == [0, 0, 0, 1]  # 8 train images, 2 per step
    assert all(r["train_loss"] > 0 and r["grad_norm"] > 0 and r["nonfinite_steps"] == 0 for r in train)
    assert [(r["step"], r["final"]) for r in evals] == [(2, False), (4, True)]
    for r in evals:
        assert len(r["per_class_iou"]) == 19 and 0 <= r["miou"] <= 1 and 0 <= r["pixel_acc"] <= 1
        assert r["val_loss"] > 0 and r["val_pixels"] > 0
    for name in ("training_curves.png", "per_class_iou.png", "confusion_matrix.png",
                 "snapshots/step_000002.png", "snapshots/step_000004.png"):
        with Image.open(run_dir / name) as image:
            assert min(image.size) > 50

    shipped = load(run_dir / "unet_model.pth")
    assert set(shipped) == INFERENCE_KEYS
    assert shipped["image_size"] == [32, 16] and len(shipped["class_names"]) == 19
    UNet(**shipped["model_config"]).load_state_dict(shipped["model"])
    best = load(run_dir / "best_model.pth")
    assert all(torch.equal(best["model"][k], v) for k, v in shipped["model"].items())

    full = load(run_dir / "checkpoint.pt")
    assert INFERENCE_KEYS | {"optimizer", "scheduler", "scaler", "config", "rng", "step", "samples_seen"} <= set(full)
    assert (full["step"], full["samples_seen"]) == (4, 8)  # the epoch follows: samples_seen // train images
    assert full["scheduler"]["last_epoch"] == 4 and full["optimizer"]["state"][0]["step"] == 4
    best_eval = max(evals, key=lambda r: r["miou"])
    assert full["best_step"] == best_eval["step"] and full["best_miou"] == pytest.approx(best_eval["miou"])


@pytest.mark.both_cpu_kinds
def test_without_cityscapes_trains_the_synthetic_demo(tmp_path, monkeypatch, capsys, native_bf16):
    monkeypatch.chdir(tmp_path)
    training.main([*TINY, "--synthetic_train", "4", "--synthetic_val", "2", "--training_iterations", "2",
                   "--out_dir", "run", "--amp", "auto", "--channels_last", "off"])
    out = capsys.readouterr().out
    assert out.startswith("preset synthetic (no Cityscapes at Dataset/cityscapes; ")
    # what --amp auto chose on this kind of CPU is printed; config.json keeps "auto"
    steps = "bf16 autocast" if native_bf16 else "float32"
    assert (f"\ncpu ({torch.backends.cpu.get_cpu_capability()}): training steps in {steps} (--amp auto), "
            f"contiguous (--channels_last off); evaluations in float32, as inference.py runs\n") in out
    config = json.loads(Path("run/config.json").read_text())
    assert (config["dataset"], config["data_root"]) == ("synthetic", "Dataset/synthetic")
    for key in ("base_lr", "decay_factor", "eval_interval"):
        assert config[key] == DEMO[key]  # demo defaults...
    assert config["base_channels"] == 4 and config["image_size"] == "32x16"  # ...explicit flags win
    assert len(list(Path("Dataset/synthetic/leftImg8bit/train").glob("*/*.png"))) == 4
    assert set(load("unet_model.pth")) == INFERENCE_KEYS  # default --model_path


def test_the_chosen_preset_and_why_come_first(city, tmp_path, capsys):
    """The data decides the preset (said in the first line), --preset overrides it, explicit flags beat both."""
    training.main(tiny_args(city, tmp_path / "by_data", "--training_iterations", "1"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"preset cityscapes (cityscapes data at {city}); flags given: --data_root --image_size")
    assert "--out_dir" in first and "--preset" not in first
    training.main(tiny_args(city, tmp_path / "chosen", "--training_iterations", "1", "--preset", "synthetic"))
    assert capsys.readouterr().out.splitlines()[0].startswith("preset synthetic (--preset); flags given:")
    config = json.loads((tmp_path / "chosen" / "config.json").read_text())
    # the demo's recipe on the data at --data_root, recognised as Cityscapes
    assert (config["preset"], config["dataset"], config["base_lr"]) == ("synthetic", "cityscapes", DEMO["base_lr"])
    assert config["base_channels"] == 4  # the flag, not the preset's 16


def test_a_synthetic_city_at_data_root_trains_the_demo_as_it_is(tmp_path, monkeypatch, capsys):
    """A city the user made (other settings than the demo's) is used untouched, with the demo defaults;
    one made with the requested settings is completed where files are missing."""
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "own"
    synthetic_city.generate(own, 3, 2, size=(48, 16), seed=5, workers=1)
    files = sorted(own.rglob("*"))
    training.main([*TINY, "--data_root", str(own), "--training_iterations", "1", "--out_dir", "run"])
    assert f"{own}: using the synthetic city there as it is (48x16, 3 train and 2 val images)" in \
        capsys.readouterr().out
    config = json.loads(Path("run/config.json").read_text())
    assert (config["dataset"], config["base_lr"]) == ("synthetic", DEMO["base_lr"])
    assert sorted(own.rglob("*")) == files and synthetic_city.read_settings(own)["num_train"] == 3

    interrupted = tmp_path / "interrupted"
    synthetic_city.generate(interrupted, 4, 2, size=(32, 16), seed=synthetic_city.TRAINING_SEED, workers=1)
    missing = sorted(interrupted.glob("leftImg8bit/train/*/*.png"))[-1]
    content = missing.read_bytes()
    missing.unlink()
    training.main([*TINY, "--dataset", "synthetic", "--data_root", str(interrupted), "--synthetic_train", "4",
                   "--synthetic_val", "2", "--training_iterations", "1", "--out_dir", "run2"])
    assert missing.read_bytes() == content


def test_train_id_files_reads_the_official_train_id_masks(make_cityscapes, tmp_path):
    """The val labelTrainIds files are rewritten to all road: only --train_id_files sees that."""
    city = make_cityscapes(size=(32, 16), counts={"train": 4, "val": 2}, train_id_files=True)
    for mask_path in city.glob("gtFine/val/*/*_gtFine_labelTrainIds.png"):
        Image.fromarray(np.zeros((16, 32), np.uint8)).save(mask_path)
    for flag in ("--train_id_files", "--no-train_id_files"):
        run_dir = tmp_path / flag
        training.main(tiny_args(city, run_dir, flag, "--training_iterations", "1"))
        [final] = records(run_dir)[1]
        if flag == "--train_id_files":  # every pixel labelled, and one class only: accuracy = its recall
            assert final["val_pixels"] == 2 * 32 * 16 and final["mean_acc"] == pytest.approx(final["pixel_acc"])
        else:
            assert final["val_pixels"] < 2 * 32 * 16  # the labelIds' ego band and void ids are ignored


def test_unlabelled_val_split_still_saves_the_weights_and_plots_iou_as_na(city, tmp_path, monkeypatch):
    """Every val pixel void: the mIoU is undefined (null), yet the first evaluation saves the best weights;
    per_class_iou.png draws undefined classes as hatched n/a bars, and a single log point gets a marker."""
    for mask_path in city.glob("gtFine/val/*/*_gtFine_labelIds.png"):
        Image.fromarray(np.zeros((16, 32), np.uint8)).save(mask_path)  # label id 0, 'unlabeled'
    figures = []

    class RecordedFigure(Figure):
        def savefig(self, *args, **kwargs):
            figures.append(self)
            super().savefig(*args, **kwargs)

    monkeypatch.setattr(visualize, "Figure", RecordedFigure)
    run_dir = tmp_path / "run"
    training.main(tiny_args(city, run_dir, "--training_iterations", "1"))
    [final] = records(run_dir)[1]
    assert (final["miou"], final["pixel_acc"], final["val_pixels"]) == (None, None, 0)
    assert set(final["per_class_iou"].values()) == {None}
    assert set(load(run_dir / "unet_model.pth")) == INFERENCE_KEYS
    _snapshot, curves, per_class, _confusion = figures
    assert all(line.get_marker() in (".", "o") for axis in curves.axes for line in axis.get_lines())
    axis = per_class.axes[0]
    assert [(bar.get_width(), bar.get_hatch()) for bar in axis.patches] == [(1, "//")] * 19
    assert [text.get_text() for text in axis.texts] == ["n/a"] * 19


def test_resuming_a_finished_run_changes_nothing_unless_given_more_steps(city, tmp_path, capsys):
    run_dir = tmp_path / "run"
    training.main(tiny_args(city, run_dir, "--training_iterations", "2"))
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    capsys.readouterr()
    training.main(["--resume", "auto", "--out_dir", str(run_dir)])
    assert capsys.readouterr().out.splitlines() == [
        f"{run_dir / 'checkpoint.pt'}: already complete (2 steps); raise --training_iterations to train further"]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == files

    training.main(["--resume", "auto", "--out_dir", str(run_dir), "--training_iterations", "3"])
    train, evals = records(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [(r["step"], r["final"]) for r in evals] == [(2, True), (3, True)]
    assert load(run_dir / "checkpoint.pt")["step"] == 3


def test_compile_trains_like_eager(city, tmp_path, monkeypatch):
    """--compile (model and loss) gives the eager run's losses and metrics up to float rounding, and
    evaluation runs the eager modules (compiled, eval mode and new batch sizes would recompile)."""
    evaluated = []
    validate = training.validate
    monkeypatch.setattr(training, "validate", lambda predictor, loader, loss_fn, *args: (
        evaluated.append((type(predictor.model), type(loss_fn))), validate(predictor, loader, loss_fn, *args))[1])
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        training.main(tiny_args(city, tmp_path / name, "--training_iterations", "3", "--dropout", "0", *extra))
        runs[name] = records(tmp_path / name)
    (eager_train, eager_evals), (compiled_train, compiled_evals) = runs["eager"], runs["compiled"]
    assert [r["train_loss"] for r in compiled_train] == pytest.approx([r["train_loss"] for r in eager_train],
                                                                      rel=1e-4)
    assert compiled_evals[-1]["val_loss"] == pytest.approx(eager_evals[-1]["val_loss"], rel=1e-4)
    assert set(evaluated) == {(UNet, CEDiceLoss)}
    assert load(tmp_path / "compiled" / "best_model.pth")["model"].keys() == \
        load(tmp_path / "eager" / "best_model.pth")["model"].keys()  # no "_orig_mod." prefixes


def test_nonfinite_step_is_skipped_and_repeats_stop(city, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "CEDiceLoss", NaNLoss)
    monkeypatch.setattr(NaNLoss, "calls", 0)
    monkeypatch.setattr(NaNLoss, "bad_calls", {2})
    run_dir = tmp_path / "skip"
    training.main(tiny_args(city, run_dir, "--training_iterations", "4", "--eval_interval", "10"))
    train, _ = records(run_dir)
    assert [r["nonfinite_steps"] for r in train] == [0, 1, 1, 1]
    assert train[1]["train_loss"] is None and train[2]["train_loss"] > 0
    full = load(run_dir / "checkpoint.pt")
    assert full["optimizer"]["state"][0]["step"] == 3  # 4 steps, one skipped
    assert all(t.isfinite().all() for t in full["model"].values() if t.is_floating_point())

    monkeypatch.setattr(NaNLoss, "calls", 0)
    monkeypatch.setattr(NaNLoss, "bad_calls", None)
    with pytest.raises(SystemExit) as exit_info:
        training.main(tiny_args(city, tmp_path / "stop", "--training_iterations", "20", "--max_nonfinite_steps", "3"))
    assert exit_info.value.code == 1
    assert "error: 3 consecutive non-finite steps (at step 3)" in capsys.readouterr().err
    assert not (tmp_path / "stop" / "checkpoint.pt").exists()


def test_nonfinite_steps_are_tallied_on_the_device_and_read_at_log_steps(city, tmp_path, monkeypatch, capsys):
    """With --log_interval 3 the loop learns of skipped steps only at steps 3, 6, ...: counts, the mean
    loss of the steps taken and the longest run of bad steps are still exact."""
    monkeypatch.setattr(training, "CEDiceLoss", NaNLoss)
    monkeypatch.setattr(NaNLoss, "calls", 0)
    monkeypatch.setattr(NaNLoss, "bad_calls", {2, 3})
    run_dir = tmp_path / "skip"
    training.main(tiny_args(city, run_dir, "--training_iterations", "6", "--eval_interval", "10", "--log_interval",
                            "3", "--max_nonfinite_steps", "3"))
    train, _ = records(run_dir)
    assert [(r["step"], r["nonfinite_steps"]) for r in train] == [(3, 2), (6, 2)]
    assert "step 3: 2 step(s) since the last log had non-finite gradients" in capsys.readouterr().out
    assert math.isfinite(train[0]["train_loss"]) and train[0]["train_loss"] > 0  # step 1's loss alone
    assert load(run_dir / "checkpoint.pt")["optimizer"]["state"][0]["step"] == 4

    monkeypatch.setattr(NaNLoss, "calls", 0)
    monkeypatch.setattr(NaNLoss, "bad_calls", None)
    with pytest.raises(SystemExit) as exit_info:
        training.main(tiny_args(city, tmp_path / "stop", "--training_iterations", "20", "--log_interval", "4",
                                "--max_nonfinite_steps", "3"))
    assert exit_info.value.code == 1
    assert "error: 4 consecutive non-finite steps (at step 4)" in capsys.readouterr().err


def test_resume_after_sigkill_is_bit_exact(city, tmp_path):
    """Evals, dropout, augmentation, a worker process and accumulation all in play; killed after a checkpoint
    with later steps already logged, then resumed with --resume auto."""
    args = ["--training_iterations", "20", "--eval_interval", "8", "--save_model_interval", "4", "--accum_steps", "2",
            "--dropout", "0.2", "--num_workers", "1"]
    training.main(tiny_args(city, tmp_path / "reference", *args))

    run_dir = tmp_path / "killed"
    process = start_training(tiny_args(city, run_dir, *args), tmp_path / "killed.log")
    while not ((run_dir / "checkpoint.pt").exists() and records(run_dir)[0][-1]["step"] > 4):
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load(run_dir / "checkpoint.pt")["step"]
    assert killed_at < records(run_dir)[0][-1]["step"] < 20 and not (run_dir / "unet_model.pth").exists()

    resumed = subprocess.run([sys.executable, "training.py", "--resume", "auto", "--out_dir", str(run_dir)],
                             cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = load(tmp_path / "reference" / "checkpoint.pt"), load(run_dir / "checkpoint.pt")
    assert got["step"] == 20
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][index][k], v) for k, v in state.items())
    expected_train, expected_evals = records(tmp_path / "reference")
    got_train, got_evals = records(run_dir)
    assert [r["step"] for r in got_train] == list(range(1, 21))  # what the kill left after the checkpoint is gone
    assert [r["train_loss"] for r in got_train] == [r["train_loss"] for r in expected_train]
    assert [(r["step"], r["miou"]) for r in got_evals] == [(r["step"], r["miou"]) for r in expected_evals]


@pytest.mark.parametrize("stop_signal, whole_group", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(city, tmp_path, stop_signal, whole_group):
    """Ctrl-C to the main process, and SIGTERM to its whole process group, DataLoader worker included, as
    `timeout` and SLURM's --signal send it."""
    run_dir = tmp_path / "run"
    process = start_training(tiny_args(city, run_dir, "--training_iterations", "100000", "--num_workers", "1"),
                             tmp_path / "log", new_session=whole_group)
    while not ((run_dir / "metrics.jsonl").exists() and len(records(run_dir)[0]) >= 2):
        assert process.poll() is None, (tmp_path / "log").read_text()
        time.sleep(0.05)
    if whole_group:
        os.killpg(process.pid, stop_signal)
    else:
        process.send_signal(stop_signal)
    assert process.wait(timeout=60) == training.INTERRUPTED_EXIT_CODE
    output = (tmp_path / "log").read_text()
    assert "Traceback" not in output and "interrupted at step" in output
    checkpoint = load(run_dir / "checkpoint.pt")
    assert 2 <= checkpoint["step"] < 100000 and checkpoint["samples_seen"] == 2 * checkpoint["step"]
    assert checkpoint["step"] == records(run_dir)[0][-1]["step"]


def test_ddp_two_processes_train_like_one_with_the_same_global_batch(city, tmp_path):
    """2 ranks x batch 2 x accum 1 vs 1 process x batch 2 x accum 2: rank r's micro-batch holds the images of
    the single process's micro-batch r, so BatchNorm sees the same batches and the weights agree up to float
    rounding. Running statistics differ by design (DDP keeps rank 0's), so only parameters are compared."""
    args = ["--training_iterations", "4", "--dropout", "0", "--eval_interval", "2", "--save_model_interval", "100"]
    training.main(tiny_args(city, tmp_path / "single", *args, "--accum_steps", "2"))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "training.py", *tiny_args(city, tmp_path / "ddp", *args)],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single, parallel = load(tmp_path / "single" / "checkpoint.pt"), load(tmp_path / "ddp" / "checkpoint.pt")
    parameters = dict(UNet(**single["model_config"]).named_parameters())
    assert parallel["config"]["accum_steps"] == 1 and len(parallel["rng"]) == 2
    for name in parameters:
        assert torch.allclose(single["model"][name], parallel["model"][name], rtol=0, atol=1e-5), name
    single_train, single_evals = records(tmp_path / "single")
    ddp_train, ddp_evals = records(tmp_path / "ddp")
    assert [r["step"] for r in ddp_train] == [1, 2, 3, 4]  # rank 0 logs alone
    assert [r["train_loss"] for r in ddp_train] == pytest.approx([r["train_loss"] for r in single_train], rel=1e-5)
    # the confusion matrices of the two val shards are summed: every labelled val pixel counted once
    assert [r["val_pixels"] for r in ddp_evals] == [r["val_pixels"] for r in single_evals]


def test_a_slow_input_pipeline_shows_in_data_wait_and_is_named_once(city, tmp_path, monkeypatch, capsys):
    training.main(tiny_args(city, tmp_path / "fast", "--training_iterations", "3"))
    assert all(0 <= r["data_wait"] < 1 for r in records(tmp_path / "fast")[0])
    capsys.readouterr()

    read = batches.SeededSamples.__getitem__

    def slow_read(self, key):
        time.sleep(0.05)
        return read(self, key)

    monkeypatch.setattr(batches.SeededSamples, "__getitem__", slow_read)
    training.main(tiny_args(city, tmp_path / "slow", "--training_iterations", "4"))
    assert all(r["data_wait"] > 0.5 for r in records(tmp_path / "slow")[0])
    hints = [line for line in capsys.readouterr().out.splitlines() if "waiting for batches" in line]
    assert len(hints) == 1 and hints[0].startswith("step 2: ") and "--num_workers" in hints[0]


def test_class_weights_are_computed_once_from_the_train_masks_and_kept_by_a_resume(city, tmp_path, capsys):
    run_dir = tmp_path / "run"
    training.main(tiny_args(city, run_dir, "--training_iterations", "2", "--class_weights", "auto"))
    label_to_train = np.full(256, 255)  # counted by hand through torchvision's table
    for cityscapes_class in Cityscapes.classes:
        if cityscapes_class.id >= 0 and 0 <= cityscapes_class.train_id < 255:
            label_to_train[cityscapes_class.id] = cityscapes_class.train_id
    pixels, present = np.zeros(19), np.zeros(19)
    for mask_path in sorted(city.glob("gtFine/train/*/*_labelIds.png")):
        counts = np.bincount(label_to_train[np.asarray(Image.open(mask_path))].ravel(), minlength=256)[:19]
        pixels, present = pixels + counts, present + np.where(counts > 0, counts.sum(), 0)
    train_set = SegmentationDataset(city, "train", (32, 16), layout="cityscapes")
    assert [counts.tolist() for counts in train_set.class_pixels()] == [pixels.tolist(), present.tolist()]
    expected = [float(f"{w:.4g}") for w in median_frequency_weights(pixels, present).tolist()]  # 4 digits
    config = json.loads((run_dir / "config.json").read_text())
    assert config["class_weights"] == "auto" and config["class_weight_values"] == pytest.approx(expected)
    assert max(expected) > 1 > min(w for w in expected if w > 0)  # rare classes weigh more
    assert "class weights: road " in capsys.readouterr().out
    assert load(run_dir / "checkpoint.pt")["config"]["class_weight_values"] == config["class_weight_values"]
    training.main(["--resume", "auto", "--out_dir", str(run_dir), "--training_iterations", "3"])
    assert "class weights" not in capsys.readouterr().out  # not computed again


    weights_file = tmp_path / "weights.txt"
    weights_file.write_text(" ".join(["1"] * 18 + ["3"]))
    training.main(tiny_args(city, tmp_path / "from_file", "--training_iterations", "1", "--class_weights",
                            str(weights_file)))
    assert json.loads((tmp_path / "from_file" / "config.json").read_text())["class_weight_values"][-1] == 3
    weights_file.write_text("1 2 3")
    with pytest.raises(SystemExit):
        training.main(tiny_args(city, tmp_path / "bad", "--training_iterations", "1", "--class_weights",
                                str(weights_file)))
    assert capsys.readouterr().err.strip().endswith(f"{weights_file}: 3 weights for 19 classes; give one number >= 0 "
                                                    f"per class (road, sidewalk, building, wall, fence, pole, traffic "
                                                    f"light, traffic sign, vegetation, terrain, sky, person, rider, "
                                                    f"car, truck, bus, train, motorcycle, bicycle), not all 0")


@pytest.mark.parametrize("data_cache", ["off", "device"])
def test_copy_paste_pastes_the_classes_below_the_median_found_in_one_scan_and_kept_by_a_resume(city, tmp_path, capsys,
                                                                                                 monkeypatch, data_cache):
    """In both input pipelines: every photo pasted at --copy_paste 1 (the cache pastes a batch of 2 at once)."""
    scans, pastes = [], []
    class_pixels, paste = SegmentationDataset.class_pixels, dataset.paste

    def counted_paste(*args):
        pastes.extend([args[4].tolist()] * (len(args[0]) if args[0].ndim == 4 else 1))
        return paste(*args)
    monkeypatch.setattr(SegmentationDataset, "class_pixels", lambda self: scans.append(1) or class_pixels(self))
    monkeypatch.setattr(dataset, "paste", counted_paste)
    monkeypatch.setattr(batches, "paste", counted_paste)
    run_dir = tmp_path / "run"
    training.main(tiny_args(city, run_dir, "--training_iterations", "2", "--copy_paste", "1", "--class_weights", "auto",
                            "--data_cache", data_cache))
    weights = median_frequency_weights(*class_pixels(SegmentationDataset(city, "train", (32, 16), layout="cityscapes")))
    rare = [c for c, weight in enumerate(weights.tolist()) if weight > 1]
    names = ClassTable.from_names().names  # Cityscapes' 19 evaluation classes
    config = json.loads((run_dir / "config.json").read_text())
    assert config["copy_paste"] == 1 and config["paste_classes"] == [names[c] for c in rare] and 0 < len(rare) < 19
    assert scans == [1]  # one scan of the masks for the weights and the rare classes
    assert len(pastes) == 4 and all(classes == rare for classes in pastes)  # 2 steps of 2 photos, every photo
    printed = f"copy-paste (1 of the train photos): {', '.join(names[c] for c in rare)}\n"
    assert printed in capsys.readouterr().out
    training.main(["--resume", "auto", "--out_dir", str(run_dir), "--training_iterations", "3"])
    assert printed in capsys.readouterr().out and scans == [1]  # the same classes, not searched again
    assert len(pastes) == 6


def test_paste_classes_names_the_classes_pasted_without_a_scan_and_a_resume_keeps_them(city, tmp_path, capsys,
                                                                                      monkeypatch):
    scans, pastes = [], []
    paste = dataset.paste
    monkeypatch.setattr(SegmentationDataset, "class_pixels", lambda self: scans.append(1))
    monkeypatch.setattr(dataset, "paste", lambda *args: pastes.append(args[4].tolist()) or paste(*args))
    run_dir = tmp_path / "run"
    training.main(tiny_args(city, run_dir, "--training_iterations", "1", "--copy_paste", "1", "--paste_classes",
                            "traffic sign", "pole"))
    assert scans == [] and pastes == [[7, 5], [7, 5]]  # Cityscapes' train ids of traffic sign and pole, in that order
    assert json.loads((run_dir / "config.json").read_text())["paste_classes"] == ["traffic sign", "pole"]
    assert "copy-paste (1 of the train photos): traffic sign, pole\n" in capsys.readouterr().out
    training.main(["--resume", "auto", "--out_dir", str(run_dir), "--training_iterations", "2"])
    assert pastes[2:] == [[7, 5], [7, 5]]
    assert json.loads((run_dir / "config.json").read_text())["paste_classes"] == ["traffic sign", "pole"]
    with pytest.raises(SystemExit):
        training.main(tiny_args(city, tmp_path / "bad", "--training_iterations", "1", "--copy_paste", "1",
                                "--paste_classes", "pole", "lamp", "--class_weights", "auto"))
    assert scans == []  # the name is checked before the masks are scanned for the class weights
    assert capsys.readouterr().err.strip().endswith("--paste_classes: ['lamp'] not among the classes trained (road, "
                                                    "sidewalk, building, wall, fence, pole, traffic light, traffic "
                                                    "sign, vegetation, terrain, sky, person, rider, car, truck, bus, "
                                                    "train, motorcycle, bicycle)")
    with pytest.raises(SystemExit):
        training.main(tiny_args(city, tmp_path / "off", "--training_iterations", "1", "--paste_classes", "pole"))
    assert capsys.readouterr().err.strip().endswith("--paste_classes pole: pasting is off; give --copy_paste P "
                                                    "(0 < P <= 1) too")
    assert not (tmp_path / "off").exists()


def test_sqrt_class_weights_are_the_square_root_of_median_frequency_balancing(city, tmp_path):
    training.main(tiny_args(city, tmp_path / "auto", "--training_iterations", "1", "--class_weights", "auto"))
    training.main(tiny_args(city, tmp_path / "sqrt", "--training_iterations", "1", "--class_weights", "sqrt"))
    auto, sqrt = (json.loads((tmp_path / run / "config.json").read_text()) for run in ("auto", "sqrt"))
    assert sqrt["class_weights"] == "sqrt"
    assert sqrt["class_weight_values"] == pytest.approx(np.sqrt(auto["class_weight_values"]), rel=1e-3)  # 4 digits
    assert 1 < max(sqrt["class_weight_values"]) < max(auto["class_weight_values"])  # milder


def test_ohem_threshold_reaches_the_loss_of_every_step(city, tmp_path, monkeypatch):
    masks = []
    hard_pixels = training.CEDiceLoss.hard_pixels
    monkeypatch.setattr(training.CEDiceLoss, "hard_pixels", lambda self, *args: masks.append(
        (self.ohem_threshold, hard_pixels(self, *args))) or masks[-1][1])
    training.main(tiny_args(city, tmp_path / "run", "--training_iterations", "3", "--ohem_threshold", "0.7"))
    assert len(masks) >= 3 and all(threshold == 0.7 for threshold, _ in masks)  # 3 steps, then the val loss
    assert all(0 < mask.mean() < 1 for _, mask in masks)  # some pixels are easy already, some hard
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ohem_threshold"] == 0.7


def test_dice_per_image_reaches_the_loss_and_is_off_by_default(city, tmp_path, monkeypatch):
    built = []
    init = training.CEDiceLoss.__init__
    monkeypatch.setattr(training.CEDiceLoss, "__init__",
                        lambda self, *args, **kwargs: init(self, *args, **kwargs) or built.append(self.dice_sum_dims))
    training.main(tiny_args(city, tmp_path / "off", "--training_iterations", "1"))
    training.main(tiny_args(city, tmp_path / "on", "--training_iterations", "1", "--dice_per_image"))
    assert built == [(0, 2, 3), (2, 3)]
    assert json.loads((tmp_path / "on" / "config.json").read_text())["dice_per_image"] is True


def test_input_norm_photo_reaches_the_model_the_weights_file_and_config_json(city, tmp_path):
    training.main(tiny_args(city, tmp_path / "run", "--training_iterations", "1", "--input_norm", "photo",
                            "--model_path", str(tmp_path / "photo.pth")))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["input_norm"] == "photo"
    model = load_weights(tmp_path / "photo.pth").model
    photos = torch.randn(2, 3, 16, 32)
    with torch.no_grad():  # what inference gets from the file: a model blind to a photo's exposure and contrast
        torch.testing.assert_close(model(photos), model(3 * photos + 1), atol=1e-4, rtol=1e-4)


def test_lovasz_weight_adds_the_lovasz_term_to_every_step_and_is_off_by_default(city, tmp_path, monkeypatch):
    terms = []
    lovasz_softmax = losses.lovasz_softmax
    monkeypatch.setattr(losses, "lovasz_softmax", lambda *args: terms.append(lovasz_softmax(*args)) or terms[-1])
    training.main(tiny_args(city, tmp_path / "off", "--training_iterations", "2"))
    assert terms == []
    training.main(tiny_args(city, tmp_path / "on", "--training_iterations", "3", "--lovasz_weight", "0.5"))
    assert len(terms) >= 3 and all(0 < term.item() < 1 for term in terms)  # 3 steps, then the val loss
    assert json.loads((tmp_path / "on" / "config.json").read_text())["lovasz_weight"] == 0.5


def test_logit_adjustment_trains_like_the_weighted_loss_and_saves_the_model_with_the_bias_removed(city, tmp_path,
                                                                                                capsys):
    """The same run with and without --logit_adjustment: every weight the same, but the head's bias lower by
    tau * log(class weight), in the weights file and in the checkpoint alike; a resume cannot change tau."""
    # a weight decay this strong would move a decayed head bias far beyond the tolerance: biases must not decay
    common = ["--training_iterations", "3", "--class_weights", "auto", "--ema_decay", "0.5", "--eval_interval", "10",
              "--weight_decay", "1"]
    training.main(tiny_args(city, tmp_path / "plain", *common))
    training.main(tiny_args(city, tmp_path / "adjusted", *common, "--logit_adjustment", "0.5"))
    config = json.loads((tmp_path / "adjusted" / "config.json").read_text())
    assert config["logit_adjustment"] == 0.5 and PRESETS["camvid"].settings["logit_adjustment"] == 0.5
    weights = torch.tensor(config["class_weight_values"])
    assert weights.max() > 2 * weights.min()  # a shift that matters
    for name, part in (("unet_model.pth", "model"), ("checkpoint.pt", "model"), ("checkpoint.pt", "trained_model")):
        plain, adjusted = (load(tmp_path / run / name)[part] for run in ("plain", "adjusted"))
        assert plain.keys() == adjusted.keys()
        for key in plain:
            expected = plain[key] - 0.5 * weights.log() if key == "head.bias" else plain[key]
            torch.testing.assert_close(adjusted[key], expected.to(adjusted[key].dtype), atol=2e-5, rtol=1e-4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        training.main(tiny_args(city, tmp_path / "adjusted", "--resume", "auto", "--training_iterations", "4",
                                "--logit_adjustment", "1"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: --logit_adjustment 1.0: {tmp_path / 'adjusted' / 'checkpoint.pt'} was "
                                       f"trained with --logit_adjustment 0.5; its model's head started from that shift\n")


@pytest.mark.parametrize("data_cache", ["off", "device"])
def test_crop_size_trains_on_crops_and_evaluates_whole_images(city, tmp_path, monkeypatch, data_cache):
    shapes = []
    forward = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x: shapes.append((self.training, tuple(x.shape))) or forward(self, x))
    run = tmp_path / "run"
    training.main(tiny_args(city, run, "--training_iterations", "2", "--crop_size", "16x8", "--data_cache", data_cache))
    assert {shape for train, shape in shapes if train} == {(2, 3, 8, 16)}
    assert {shape[1:] for train, shape in shapes if not train} == {(3, 16, 32)}  # val and snapshots: whole images
    assert json.loads((run / "config.json").read_text())["crop_size"] == "16x8"
    assert tuple(load(run / "unet_model.pth")["image_size"]) == (32, 16)  # what inference resizes photos to


def test_the_weight_average_follows_its_ramped_decay_and_resumes_exactly(city, tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
    average = training.WeightAverage(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)  # decay min(0.9, 2 / 11)
    expected = start + (1 - 2 / 11) * 1.0
    torch.testing.assert_close(average.model[0].weight, expected)
    assert average.model[1].num_batches_tracked == model[1].num_batches_tracked

    args = ["--ema_decay", "0.8", "--dropout", "0.2", "--save_model_interval", "3", "--eval_interval", "100"]
    training.main(tiny_args(city, tmp_path / "whole", *args, "--training_iterations", "6"))
    training.main(tiny_args(city, tmp_path / "halves", *args, "--training_iterations", "3"))
    training.main(["--resume", "auto", "--out_dir", str(tmp_path / "halves"), "--training_iterations", "6"])
    whole, halves = load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "halves" / "checkpoint.pt")
    for key in ("model", "trained_model"):  # the average (what is evaluated) and the trained weights
        assert all(torch.equal(halves[key][name], tensor) for name, tensor in whole[key].items()), key
    assert whole["average_updates"] == halves["average_updates"] == 6
    assert any(not torch.equal(whole["trained_model"][name], tensor) for name, tensor in whole["model"].items())
    # the only evaluation (the final one) scored the average, so the best weights are the average's
    best = load(tmp_path / "whole" / "best_model.pth")
    assert all(torch.equal(best["model"][name], tensor) for name, tensor in whole["model"].items())


def test_time_budget_fixes_the_step_count_after_the_first_evaluation_and_resumes_exactly(city, tmp_path, capsys,
                                                                                          monkeypatch):
    """The count the budget allows (here fixed by hand, as timing is the machine's) is printed, kept in config.json
    and the checkpoint, and gives the weights of a run told that count: the schedule has no end point to move. An
    interrupted budget run resumes to the same count and the same weights."""
    seen = []
    monkeypatch.setattr(training, "steps_within_budget", lambda *args: seen.append(args) or 5)
    common = ["--eval_interval", "2", "--save_model_interval", "2", "--dropout", "0"]
    training.main(tiny_args(city, tmp_path / "budget", *common, "--time_budget", "0.5"))
    budget_s, elapsed_s, step, seconds_per_step = seen[0]
    assert (budget_s, step) == (30, 2) and 0 < 2 * seconds_per_step <= elapsed_s
    assert "training for 5 steps" in capsys.readouterr().out
    config = json.loads((tmp_path / "budget" / "config.json").read_text())
    assert (config["time_budget"], config["training_iterations"]) == (0.5, 5)
    assert load(tmp_path / "budget" / "checkpoint.pt")["step"] == 5
    training.main(tiny_args(city, tmp_path / "fixed", *common, "--training_iterations", "5"))
    budget, fixed = (load(tmp_path / run / "unet_model.pth")["model"] for run in ("budget", "fixed"))
    assert all(torch.equal(budget[key], fixed[key]) for key in fixed)

    calls, agreed = [], training.StopRequest.agreed
    monkeypatch.setattr(training.StopRequest, "agreed", lambda self, device: calls.append(1) or len(calls) == 3)
    with pytest.raises(SystemExit) as exit_info:
        training.main(tiny_args(city, tmp_path / "stopped", *common, "--time_budget", "0.5"))
    assert exit_info.value.code == training.INTERRUPTED_EXIT_CODE
    assert load(tmp_path / "stopped" / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(training.StopRequest, "agreed", agreed)
    monkeypatch.setattr(training, "steps_within_budget", lambda *args: pytest.fail("the count is fixed already"))
    training.main(["--resume", "auto", "--out_dir", str(tmp_path / "stopped")])
    resumed = load(tmp_path / "stopped" / "unet_model.pth")["model"]
    assert all(torch.equal(resumed[key], budget[key]) for key in budget)

    calls.clear()  # stopped at step 1, before the count is fixed: the resumed process fixes it, with the time before
    monkeypatch.setattr(training.StopRequest, "agreed", lambda self, device: calls.append(1) or len(calls) == 1)
    with pytest.raises(SystemExit):
        training.main(tiny_args(city, tmp_path / "early", *common, "--time_budget", "0.5"))
    early = load(tmp_path / "early" / "checkpoint.pt")
    assert (early["step"], early["config"]["training_iterations"]) == (1, None) and early["seconds"] > 0
    monkeypatch.setattr(training.StopRequest, "agreed", agreed)
    seen.clear()
    monkeypatch.setattr(training, "steps_within_budget", lambda *args: seen.append(args) or 5)
    training.main(["--resume", "auto", "--out_dir", str(tmp_path / "early")])
    _, elapsed_s, step, _ = seen[0]
    assert step == 2 and elapsed_s > early["seconds"]  # the stopped process's time counts against the budget
    resumed = load(tmp_path / "early" / "unet_model.pth")["model"]
    assert all(torch.equal(resumed[key], budget[key]) for key in budget)


def test_time_budget_with_a_step_count_or_a_new_budget_on_resume_is_one_line(city, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(tiny_args(city, tmp_path / "both", "--time_budget", "5", "--training_iterations", "10"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --time_budget and --training_iterations: give one (the budget fixes "
                                       "the step count)\n")
    training.main(tiny_args(city, tmp_path / "run", "--training_iterations", "2"))
    with pytest.raises(SystemExit):
        training.main(["--resume", "auto", "--out_dir", str(tmp_path / "run"), "--time_budget", "5"])
    assert "--time_budget 5.0: " in capsys.readouterr().err
