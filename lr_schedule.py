"""The learning-rate schedule of the original project: quadratic warmup, then inverse-square-root decay.

With s = optimizer step (0-based), W = warmup_steps, d = decay_factor:

    lr(s) = min_lr + (base_lr - min_lr) * (s / W)**2                 for s < W
    lr(s) = max(min_lr, base_lr / sqrt(1 + d * (s - W)))              for s >= W

The warmup rises slowly at first (gentle on freshly initialised BatchNorm statistics) and reaches
base_lr exactly at s = W, where the decay starts, so the curve is continuous at the peak.
d is per step: the lr halves 3 / d steps after the peak and quarters after 15 / d; d = 0 keeps
base_lr forever. W = 0 skips the warmup.
"""
import argparse
import math
import sys

import torch
from matplotlib.figure import Figure

from runtime import run_cli, save_figure


def check_schedule_args(base_lr, warmup_steps, decay_factor, min_lr):
    """Raise ValueError on a config that would give a negative, NaN or non-decaying curve."""
    if warmup_steps < 0:
        raise ValueError(f"lr_schedule: warmup_steps must be >= 0, got {warmup_steps}")
    if decay_factor < 0:
        raise ValueError(f"lr_schedule: decay_factor must be >= 0, got {decay_factor}")
    if min_lr < 0:
        raise ValueError(f"lr_schedule: min_lr must be >= 0, got {min_lr}")
    if min_lr > base_lr:
        raise ValueError(f"lr_schedule: min_lr ({min_lr}) must not exceed base_lr ({base_lr})")


def lr_at(step, base_lr, warmup_steps, decay_factor, min_lr):
    """Learning rate used at optimizer step `step` (0-based); the formula in the module docstring."""
    check_schedule_args(base_lr, warmup_steps, decay_factor, min_lr)
    if step < 0:
        raise ValueError(f"lr_schedule: step must be >= 0, got {step}")
    if step < warmup_steps:
        return min_lr + (base_lr - min_lr) * (step / warmup_steps) ** 2
    return max(min_lr, base_lr / math.sqrt(1 + decay_factor * (step - warmup_steps)))


class WarmupInverseSqrtLR(torch.optim.lr_scheduler.LRScheduler):
    """`lr_at` as a torch scheduler; each param group's initial lr is its base_lr.

    Call `step()` once per optimizer step. The lr is recomputed from the closed form, never
    updated multiplicatively, so a scheduler restored from `state_dict` continues exactly.
    """

    def __init__(self, optimizer, warmup_steps, decay_factor, min_lr, last_epoch=-1):
        for group in optimizer.param_groups:
            check_schedule_args(group.get("initial_lr", group["lr"]), warmup_steps, decay_factor, min_lr)
        self.warmup_steps = warmup_steps
        self.decay_factor = decay_factor
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [lr_at(self.last_epoch, base_lr, self.warmup_steps, self.decay_factor, self.min_lr)
                for base_lr in self.base_lrs]


def plot_schedule(path, base_lr, min_lr, warmup_steps, decay_factor, total_steps):
    """Write the schedule over `total_steps` optimizer steps to a PNG, marking the end of warmup."""
    if total_steps < 1:
        raise ValueError(f"lr_schedule: total_steps must be >= 1, got {total_steps}")
    steps = range(total_steps)
    lrs = [lr_at(s, base_lr, warmup_steps, decay_factor, min_lr) for s in steps]
    fig = Figure(figsize=(7, 4), layout="constrained")  # no pyplot: headless, no global state
    ax = fig.add_subplot()
    ax.plot(steps, lrs)
    ax.axvline(warmup_steps, color="gray", linestyle="--", label=f"end of warmup (step {warmup_steps})")
    ax.axhline(min_lr, color="red", linestyle=":", label=f"min_lr = {min_lr:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"quadratic warmup + inverse-sqrt decay\nbase_lr={base_lr:g}, decay_factor={decay_factor:g}")
    ax.legend()
    save_figure(fig, path)


def build_parser():
    parser = argparse.ArgumentParser(description="Plot the learning-rate schedule used by training.py (the "
                                     "defaults are training.py's for Cityscapes).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_lr", type=float, default=1e-3, help="peak lr, reached at the end of warmup")
    parser.add_argument("--min_lr", type=float, default=1e-5, help="starting lr and floor of the decay")
    parser.add_argument("--warmup_steps", type=int, default=100, help="optimizer steps of quadratic warmup")
    parser.add_argument("--decay_factor", type=float, default=3e-3,
                        help="per-step decay speed: lr halves 3/decay_factor steps after the peak")
    parser.add_argument("--training_iterations", type=int, default=1860, help="optimizer steps to plot")
    parser.add_argument("--out", default="lr_schedule.png", help="output PNG path")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    def run():
        plot_schedule(args.out, args.base_lr, args.min_lr, args.warmup_steps, args.decay_factor,
                      args.training_iterations)
        print(f"wrote {args.out}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
