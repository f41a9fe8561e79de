import pytest
import torch
from PIL import Image

import lr_schedule
from config import TrainConfig
from lr_schedule import WarmupInverseSqrtLR, lr_at, plot_schedule

CONFIG = dict(base_lr=1e-3, warmup_steps=100, decay_factor=0.01, min_lr=1e-5)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-5),                          # warmup starts at min_lr
    (50, 1e-5 + (1e-3 - 1e-5) * 0.25),  # half way: (1/2)**2 of the rise
    (99, 1e-5 + (1e-3 - 1e-5) * 0.99 ** 2),
    (100, 1e-3),                        # the peak
    (400, 5e-4),                        # 3 / decay_factor steps past the peak: halved
    (1600, 2.5e-4),                     # 15 / decay_factor steps past: quartered
    (10 ** 7, 1e-5),                    # floored at min_lr
])
def test_hand_values(step, expected):
    assert lr_at(step, **CONFIG) == pytest.approx(expected, rel=1e-12)


def test_no_warmup_starts_at_peak():
    assert lr_at(0, base_lr=0.1, warmup_steps=0, decay_factor=1.0, min_lr=0.0) == 0.1
    assert lr_at(3, base_lr=0.1, warmup_steps=0, decay_factor=1.0, min_lr=0.0) == pytest.approx(0.05)


def test_shape_of_the_curve():
    lrs = [lr_at(s, **CONFIG) for s in range(3000)]
    warmup, decay = lrs[:101], lrs[100:]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert min(lrs) >= CONFIG["min_lr"]
    assert max(lrs) == lrs[100] == CONFIG["base_lr"]
    # continuous at the peak: the steps on either side are close to it
    assert lrs[99] == pytest.approx(1e-3, rel=0.03) and lrs[101] == pytest.approx(1e-3, rel=0.01)


def make_optimizer(lrs=(1e-3, 4e-3)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, momentum=0.9)


def run_steps(optimizer, scheduler, num_steps):
    """Lr actually used by each optimizer step, one row per param group."""
    used = []
    for _ in range(num_steps):
        used.append([group["lr"] for group in optimizer.param_groups])
        for group in optimizer.param_groups:
            group["params"][0].grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    return used


def test_scheduler_uses_lr_at_for_every_step_and_group():
    optimizer = make_optimizer()
    scheduler = WarmupInverseSqrtLR(optimizer, warmup_steps=5, decay_factor=0.5, min_lr=1e-4)
    used = run_steps(optimizer, scheduler, 30)
    for step, lrs in enumerate(used):
        expected = [lr_at(step, base, 5, 0.5, 1e-4) for base in (1e-3, 4e-3)]
        assert lrs == pytest.approx(expected, rel=1e-12)


def test_state_dict_round_trip_resumes_identically():
    kwargs = dict(warmup_steps=5, decay_factor=0.5, min_lr=1e-4)
    optimizer = make_optimizer()
    scheduler = WarmupInverseSqrtLR(optimizer, **kwargs)
    uninterrupted = run_steps(optimizer, scheduler, 25)

    optimizer = make_optimizer()
    scheduler = WarmupInverseSqrtLR(optimizer, **kwargs)
    first = run_steps(optimizer, scheduler, 10)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    optimizer = make_optimizer(lrs=(9.0, 9.0))  # whatever the fresh config says, the checkpoint wins
    scheduler = WarmupInverseSqrtLR(optimizer, **kwargs)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resumed = run_steps(optimizer, scheduler, 15)
    assert first + resumed == uninterrupted


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "lr.png"
    plot_schedule(path, base_lr=1e-3, min_lr=1e-5, warmup_steps=50, decay_factor=0.01, total_steps=500)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (700, 400)
    assert 5_000 < path.stat().st_size < 500_000


def test_cli_writes_png_and_rejects_bad_args(tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert lr_schedule.main(["--warmup_steps", "10", "--training_iterations", "100", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert lr_schedule.main(["--min_lr", "1", "--base_lr", "0.1", "--out", str(tmp_path / "bad.png")]) == 2
    assert capsys.readouterr().err.startswith("error: lr_schedule: min_lr")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(decay_factor=-0.1), "decay_factor"),
    (dict(min_lr=-1e-6), "min_lr"),
    (dict(min_lr=1e-2), "exceed"),
    (dict(step=-1), "step"),
])
def test_bad_args_raise(kwargs, match):
    args = dict(CONFIG, step=0) | kwargs
    with pytest.raises(ValueError, match=match):
        lr_at(**args)


def test_scheduler_rejects_min_lr_above_a_group_lr():
    with pytest.raises(ValueError, match="exceed"):
        WarmupInverseSqrtLR(make_optimizer(lrs=(1e-3, 1e-5)), warmup_steps=5, decay_factor=0.1, min_lr=1e-4)


def test_cli_defaults_are_those_of_the_cityscapes_preset():
    defaults = vars(lr_schedule.build_parser().parse_args([]))
    config = TrainConfig()
    for key in ("base_lr", "min_lr", "warmup_steps", "decay_factor", "training_iterations"):
        assert defaults[key] == getattr(config, key), key
