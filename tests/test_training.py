"""training.py in parts: config resolution and presets, one training step (accumulation, no host sync,
non-finite steps skipped), validation, precision and layout choices, the time budget's arithmetic."""
import contextlib
import copy
import dataclasses
import os
import types

import pytest
import torch

import training
import config as config_module
from config import PRESETS, TrainConfig
from dataset import Indexed, collate_indexed
from losses import CEDiceLoss
import runtime
from runtime import UserError, autocast_dtype, use_channels_last
from runtime import cpu_has_native_bf16 as real_cpu_has_native_bf16
from unet import Predictor, UNet, weights_dict
from conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def step_run(model, batches, accum_steps, loss_fn, optimizer, scaler, autocast, grad_clip, device=torch.device("cpu"),
             memory_format=torch.contiguous_format):
    """What training.train_step reads of a Run, for a step outside training.py's loop."""
    return types.SimpleNamespace(step_model=model, data=types.SimpleNamespace(train=batches), step_loss_fn=loss_fn,
                                 config=types.SimpleNamespace(accum_steps=accum_steps, grad_clip=grad_clip),
                                 optimizer=optimizer, scaler=scaler, autocast=autocast, device=device,
                                 memory_format=memory_format)


class HostReadError(AssertionError):
    pass


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    flags = [field.name for field in dataclasses.fields(TrainConfig) if field.metadata]
    for key in flags:
        assert f"--{key}" in help_text
    assert help_text.count("(default:") >= len(flags) - 1  # all but --preset, whose default is the data's choice
    base_channels_note = "(default: 64; synthetic: 16; camvid: 16 (32 on a GPU); folder: 16 (32 on a GPU))"
    assert base_channels_note in help_text
    assert ("camvid: 240x180 (480x360 on a GPU, 320x240 on a CPU with native bf16); folder: 240x180 (480x360 on a "
            "GPU, 320x240 on a CPU with native bf16)") in help_text  # --image_size
    assert "camvid: CamVid as the SegNet tutorial distributes it" in help_text
    assert help_text.count("on a CPU with native bf16: image_size=320x240") == 2  # camvid and folder
    assert "images per micro-batch and process (default: 8" in help_text
    assert "synthetic: 8)" not in help_text  # the demo's batch size is the default's: not repeated
    for name, preset in PRESETS.items():  # the presets are listed with what each sets
        assert f"{name}: {preset.description}" in help_text


def test_data_root_without_cityscapes_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    missing, junk = tmp_path / "missing", tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for argv, named in ((["--data_root", str(missing)], str(missing)), (["--data_root", str(empty)], str(empty)),
                        (["--dataset", "cityscapes"], "Dataset/cityscapes"), (["--resume", str(junk)], str(junk)),
                        (["--resume", str(missing)], str(missing))):
        with pytest.raises(SystemExit) as exit_info:
            training.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and error.startswith("error: ") and named in error
    assert sorted(os.listdir(tmp_path)) == ["empty", "junk.pt"]  # nothing generated, no run folder


@pytest.mark.parametrize("flags, message", [
    (["--grad_clip", "-1"], "--grad_clip must be >= 0, got -1.0"),
    (["--grad_clip", "nan"], "--grad_clip must be >= 0, got nan"),
    (["--eval_iterations", "-1"], "--eval_iterations must be >= 0, got -1"),
    (["--weight_decay", "-0.01"], "--weight_decay must be >= 0, got -0.01"),
    (["--color_jitter", "-0.2"], "--color_jitter must be >= 0, got -0.2"),
    (["--num_workers", "-1"], "--num_workers must be >= 0, got -1"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--hflip_prob", "1.5"], "--hflip_prob must be in [0, 1], got 1.5"),
    (["--copy_paste", "-0.1"], "--copy_paste must be in [0, 1], got -0.1"),
    (["--copy_paste", "nan"], "--copy_paste must be in [0, 1], got nan"),
    (["--ohem_threshold", "70"], "--ohem_threshold must be in [0, 1], got 70.0"),
    (["--lovasz_weight", "-1"], "--lovasz_weight must be >= 0, got -1.0"),
    (["--logit_adjustment", "-0.5"], "--logit_adjustment must be in [0, 1], got -0.5"),
    (["--logit_adjustment", "inf"], "--logit_adjustment must be in [0, 1], got inf"),
    (["--logit_adjustment", "0.5"], "--logit_adjustment 0.5 takes out part of the class weights' bias, but "
                                    "--class_weights is none; give --class_weights auto, sqrt or a file, or drop it"),
    (["--base_lr", "0"], "--base_lr must be > 0, got 0.0"),
    (["--min_lr", "0.01"], "--min_lr must be in [0, --base_lr 0.001], got 0.01"),
    (["--min_lr=-1e-5"], "--min_lr must be in [0, --base_lr 0.001], got -1e-05"),
    (["--scale_range", "2", "1"], "--scale_range must be LOW HIGH with 0 < LOW <= HIGH, got [2.0, 1.0]"),
    (["--scale_range", "0", "1"], "--scale_range must be LOW HIGH with 0 < LOW <= HIGH, got [0.0, 1.0]"),
    (["--class_weights", "mfb"], "--class_weights mfb: expected none, auto, sqrt, or a file of weights"),
    (["--crop_size", "0x8"], "--crop_size: invalid size '0x8': expected WIDTHxHEIGHT with positive integers, e.g. "
                             "512x256"),
    (["--scale_range", "1", "1", "--crop_size", "40x16"], "--crop_size 40x16 is larger than --image_size 32x16 at the "
                                                           "largest --scale_range 1.0: every crop would be partly padding"),
])
def test_invalid_flag_is_a_one_line_error(flags, message, city, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(tiny_args(city, tmp_path / "run", "--training_iterations", "1", *flags))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_the_camvid_preset_trains_at_full_size_on_a_gpu(make_camvid, monkeypatch):
    """A new run on a GPU takes the preset's GPU settings (said in why); on the CPU, or with flags, it does not."""
    root = str(make_camvid())
    monkeypatch.setattr(config_module.torch.cuda, "is_available", lambda: True)
    on_gpu, why = config_module.resolve({"data_root": root})
    assert (on_gpu.image_size, on_gpu.base_channels, on_gpu.depth) == ("480x360", 32, 5)
    assert (on_gpu.time_budget, on_gpu.training_iterations) == (30, None)  # 30 minutes there too: the run fixes its steps
    assert (on_gpu.scale_range, on_gpu.color_jitter) == ((0.5, 2.0), 0.2)  # a long run gets augmentation back
    assert why.startswith(f"camvid data at {root}; on a GPU: --image_size 480x360 ")
    flagged, _ = config_module.resolve({"data_root": root, "image_size": "320x240"})
    assert (flagged.image_size, flagged.base_channels) == ("320x240", 32)
    on_cpu, why = config_module.resolve({"data_root": root, "device": "cpu"})
    assert (on_cpu.image_size, on_cpu.base_channels, why) == ("240x180", 16, f"camvid data at {root}")
    assert (on_cpu.scale_range, on_cpu.color_jitter, on_cpu.hflip_prob) == ((1.0, 1.0), 0.0, 0.5)  # flips only


def test_the_real_photo_presets_train_larger_photos_where_the_cpu_trains_in_bf16_natively(make_camvid, tmp_path,
                                                                                         monkeypatch):
    """Such a CPU runs more than twice the steps in the 30 minutes: the camvid and folder presets train 320x240
    photos there (said in why), not where training is float32 (--amp off, or no native bf16), nor on a GPU; flags
    win."""
    root = str(make_camvid())
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    larger, why = config_module.resolve({"data_root": root, "device": "cpu"})
    assert (larger.image_size, larger.base_channels, larger.depth, larger.time_budget) == ("320x240", 16, 5, 30)
    assert why == f"camvid data at {root}; on a CPU with native bf16: --image_size 320x240"
    assert config_module.resolve({"data_root": root, "device": "cpu", "amp": "bf16"})[0].image_size == "320x240"
    assert config_module.resolve({"data_root": root, "device": "cpu", "amp": "off"})[0].image_size == "240x180"
    given, why = config_module.resolve({"data_root": root, "device": "cpu", "image_size": "160x120"})
    assert (given.image_size, why) == ("160x120", f"camvid data at {root}")  # nothing left for the machine to set
    folder = config_module.resolve({"preset": "folder", "data_root": root, "device": "cpu"})[0]
    assert folder.image_size == "320x240"
    assert config_module.resolve({"data_root": root, "device": "cuda"})[0].image_size == "480x360"  # the GPU's own
    assert config_module.resolve({"data_root": root, "device": "xpu"})[0].image_size == "240x180"  # not a CPU
    demo = config_module.resolve({"preset": "synthetic", "device": "cpu", "out_dir": str(tmp_path)})[0]
    assert demo.image_size == PRESETS["synthetic"].settings["image_size"]  # the demo has no such setting
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert config_module.resolve({"data_root": root, "device": "cpu"})[0].image_size == "240x180"


def test_the_precision_line_names_devices_other_than_the_cpu_and_cuda():
    run = types.SimpleNamespace(device=torch.device("meta"), amp_dtype=None, memory_format=torch.channels_last,
                                config=types.SimpleNamespace(amp="off", channels_last="on"))
    assert training.precision_line(run) == ("meta (meta): training steps in float32 (--amp off), channels_last "
                                             "(--channels_last on); evaluations in float32, as inference.py runs")


def test_the_camvid_presets_logit_adjustment_goes_with_its_class_weights(make_camvid):
    root = str(make_camvid())
    preset, _ = config_module.resolve({"data_root": root, "device": "cpu"})
    assert (preset.class_weights, preset.logit_adjustment) == ("auto", 0.5)
    unweighted, _ = config_module.resolve({"data_root": root, "device": "cpu", "class_weights": "none"})
    assert unweighted.logit_adjustment == 0.0  # nothing to adjust, and config.json says so
    with pytest.raises(config_module.UserError, match="--logit_adjustment 0.5 takes out part of the class weights' "
                                                      "bias, but --class_weights is none"):
        config_module.resolve({"data_root": root, "class_weights": "none", "logit_adjustment": 0.5})


def test_accumulation_equals_one_larger_batch():
    """accum 2 x batch 2 == batch 4, on a model without BatchNorm (whose statistics are per micro-batch)
    and a per-image-mean loss (CE, every pixel labelled; the batch-level Dice is not a per-image mean)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, 3, padding=1)
    images, masks = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4, 8, 8))
    loss_fn = CEDiceLoss(5, dice_weight=0.0)

    def step(batches, grad_clip=0.0):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=0.1, fused=True)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, norm, finite = training.train_step(step_run(trained, iter(batches), len(batches), loss_fn, optimizer,
                                                          scaler, contextlib.nullcontext, grad_clip))
        assert finite
        return trained, loss, norm

    big, big_loss, big_norm = step([(images, masks)])
    small, small_loss, small_norm = step([(images[:2], masks[:2]), (images[2:], masks[2:])])
    assert torch.allclose(big_loss, small_loss, atol=1e-6) and torch.allclose(big_norm, small_norm, atol=1e-6)
    for p, q in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.equal(big.weight, model.weight)
    clipped, _, clipped_norm = step([(images, masks)], grad_clip=1e-3)
    assert torch.equal(clipped_norm, big_norm)  # the logged norm is the one before clipping


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_train_step_never_reads_a_tensor_back(monkeypatch, amp):
    """No .item(), bool(), float(), .tolist() or .cpu() in a training step (on a GPU each waits for it to
    finish), a NaN step included; the loop reads its tallies back only at log steps. fp16 brings the
    GradScaler's unscale/update in."""
    config = TrainConfig(device="cpu", base_channels=4, depth=2, amp=amp)
    device, amp_dtype, memory_format = training.setup_device(config, 0)
    model, optimizer, _, scaler = training.build_training(config, 5, device, memory_format, amp_dtype)
    assert scaler.is_enabled() == (amp == "fp16")
    images, masks = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
    batches = iter([(images, masks), (images, masks), (images * float("nan"), masks)])
    loss_fn = CEDiceLoss(5)

    def refuse(*args, **kwargs):
        raise HostReadError("a tensor was read back to the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    results = [training.train_step(step_run(model, batches, accum_steps, loss_fn, optimizer, scaler,
                                            contextlib.nullcontext, 1.0, device)) for accum_steps in (2, 1)]
    monkeypatch.undo()
    (_, norm, finite), (nan_loss, nan_norm, nan_finite) = results
    assert finite.dtype == torch.bool and bool(finite) and float(norm) > 0
    assert not bool(nan_finite) and nan_loss.isnan() and not nan_norm.isfinite()
    assert optimizer.state[next(model.parameters())]["step"] == 1  # the NaN step was skipped
    if amp == "fp16":
        assert scaler.get_scale() == 2.0 ** 16 / 2  # ... and the GradScaler backed off once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_on_cuda_does_not_sync():
    """The same on a GPU, with training.py's CUDA defaults (bf16, channels_last, fused AdamW) and pinned
    batches as the loader gives them: CUDA's sync debug mode turns any host sync into an error."""
    config = TrainConfig(device="cuda", base_channels=8, depth=2)
    device, amp_dtype, memory_format = training.setup_device(config, 0)
    model, optimizer, _, scaler = training.build_training(config, 5, device, memory_format, amp_dtype)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    batches = iter([(batch.pin_memory(), masks.pin_memory()) for batch in (images, images, images * float("nan"))])
    loss_fn = CEDiceLoss(5).to(device)

    def step():
        return training.train_step(step_run(model, batches, 1, loss_fn, optimizer, scaler,
                                            lambda: torch.autocast("cuda", dtype=amp_dtype), 1.0, device, memory_format))

    step()  # warm-up: cuDNN picks its algorithms
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(), step()]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(results[0][2]) and not bool(results[1][2])
    assert optimizer.state[next(model.parameters())]["step"].item() == 2


def test_nonfinite_step_leaves_weights_and_optimizer_untouched():
    """A skipped step is no step at all: weights, Adam moments and the step count stay bit for bit, and
    the next finite step equals the one a run without the bad batch would have taken (no dropout, whose
    draws the bad step would have used up)."""
    config = TrainConfig(device="cpu", base_channels=4, depth=2, dropout=0.0)
    images, masks = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))

    def states_after_each_step(batches):
        model, optimizer, _, scaler = training.build_training(config, 5, torch.device("cpu"), torch.contiguous_format,
                                                              None)
        states = []
        for batch in batches:
            training.train_step(step_run(model, iter([batch]), 1, CEDiceLoss(5), optimizer, scaler,
                                         contextlib.nullcontext, 1.0))
            states.append(copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"])))
        return states

    clean = states_after_each_step([(images, masks), (images.flip(-1), masks.flip(-1))])
    with_nan = states_after_each_step([(images, masks), (images * float("nan"), masks),
                                       (images.flip(-1), masks.flip(-1))])
    torch.testing.assert_close(with_nan[1], with_nan[0], rtol=0, atol=0)
    torch.testing.assert_close(with_nan[2], clean[1], rtol=0, atol=0)


def test_validate_matches_a_hand_count_and_records_no_graph():
    """validate: loss averaged per image over all batches, the confusion matrix of argmax predictions,
    under inference_mode (no autograd graph: evaluation memory stays that of a forward pass)."""
    images = torch.zeros(3, 1, 2, 2)
    images[:, 0, 0, 0] = 5.0  # class 1 where the pixel is 5, else class 0
    masks = torch.tensor([[[1, 0], [0, 255]]] * 3)
    model = torch.nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[[-1.0]]], [[[1.0]]]]))
        model.bias.zero_()
    seen_grad_modes = []

    def loss_fn(logits, target):
        seen_grad_modes.append((torch.is_inference_mode_enabled(), logits.requires_grad))
        return torch.full((), float(len(target)))  # 2 for a batch of 2, 1 for the last batch of 1

    loader = torch.utils.data.DataLoader(Indexed(list(zip(images, masks))), batch_size=2, collate_fn=collate_indexed)
    val_loss, results, confusion = training.validate(Predictor(copy.deepcopy(model), torch.device("cpu")), loader,
                                                     loss_fn, 2)
    assert seen_grad_modes == [(True, False), (True, False)]
    assert val_loss == pytest.approx((2 * 2 + 1 * 1) / 3)
    assert confusion.tolist() == [[6, 0], [0, 3]]  # 9 labelled pixels (3 ignored), all right
    assert results["miou"] == 1.0 and model.training


@pytest.mark.parametrize("choice, device, capability, expected", [
    ("auto", "cuda", "AVX2", True), ("auto", "cpu", "AVX512", True), ("auto", "cpu", "AVX2", False),
    ("auto", "cpu", "DEFAULT", False), ("on", "cpu", "AVX2", True), ("off", "cuda", "AVX512", False)])
def test_channels_last_auto_follows_the_measured_layouts(monkeypatch, choice, device, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert use_channels_last(choice, torch.device(device), training=True) is expected


def test_nonfinite_weights_are_never_saved():
    broken = UNet(base_channels=4, depth=2)
    with torch.no_grad():
        broken.head.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match="head.bias"):
        weights_dict(broken, ["road"], [(128, 64, 128)], (32, 16), (0.5,) * 3, (0.2,) * 3, "cityscapes")


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, None)])
def test_amp_auto_is_bf16_on_cpus_with_native_bf16_and_float32_on_others(monkeypatch, avx512_bf16, amx, expected):
    """For training; inference and evaluation run float32 on every CPU unless --amp bf16 asks otherwise."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", real_cpu_has_native_bf16)  # conftest pins it otherwise
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is expected
    assert autocast_dtype("auto", cpu, training=False) is None
    for training_too in (True, False):
        assert autocast_dtype("off", cpu, training_too) is None
        assert autocast_dtype("bf16", cpu, training_too) is torch.bfloat16


def test_steps_within_budget_counts_the_steps_that_fit_by_hand():
    # at step 300, 660 s into an 1800 s budget, 2 s a step: the 1140 s left hold 570 more steps
    assert training.steps_within_budget(1800, 660, 300, 2.0) == 300 + 570
    assert training.steps_within_budget(1800, 660, 300, 2.1) == 300 + 542  # rounded down: never over the budget
    assert training.steps_within_budget(600, 660, 300, 2.0) == 300  # over budget already: stop where it stands


def test_a_resume_told_an_image_size_smaller_than_its_crop_is_a_one_line_error():
    """A resumed run keeps its checkpoint's crop: an --image_size that crop no longer fits is named, not padded."""
    saved = TrainConfig(image_size="480x360", crop_size="320x240", scale_range=(1.0, 1.0)).to_dict()
    with pytest.raises(UserError, match=r"^--crop_size 320x240 is larger than --image_size 240x180 at the largest "
                                        r"--scale_range 1.0: every crop would be partly padding$"):
        config_module.resolve({"image_size": "240x180"}, saved)
    assert config_module.resolve({"image_size": "640x480"}, saved)[0].crop == (320, 240)
