"""Each training fast path on and off: training.py's step with its defaults, against the same step with
one fast path switched off (or, where the default leaves it off, on), all timed round-robin in one run.

    python -m bench.fast_paths                                      # CPU, classic U-Net at 512x256, batch 1
    python -m bench.fast_paths --device cuda --batch_size 32 --steps_per_call 5 --compile --record

Rows (CUDA-only switches are left out on the CPU, where training.py does not use them):
- defaults:              what `python training.py` does on this device (bench/train_step.py "ours")
- amp off:               float32 instead of bf16 autocast, TF32 tensor cores still on (CUDA)
- amp off, TF32 off:     float32 the way PyTorch does it out of the box for matmuls (CUDA)
- channels_last on/off:  the other memory format than --channels_last auto picks on this device
- host sync every step:  `.item()` on each step's loss, as tutorial loops do: the host then waits for
                         the GPU instead of queueing the next step (visible with --steps_per_call > 1)
- freed memory returned: glibc's default malloc (CPU only), which returns large blocks to the kernel, so
                         every step page-faults its activations in anew; training.py keeps them
- compile:               --compile, torch.compile of model and loss (with --compile only: it takes minutes)
cudnn.benchmark has no row: cuDNN's plan cache is keyed without it, so in one process an "off" row
would reuse the plans the defaults row benchmarked; `bench/train_step.py --cudnn_benchmark off`
measures it in a process of its own. Pinned memory, loader workers and the device data cache concern
the input pipeline, which this step does not use: bench/data_loading.py and bench/epoch.py
(--data_cache device) measure those.
"""
import argparse

import torch

from bench import harness
from bench.train_step import build_step, training_flops
from runtime import keep_freed_memory, resolve_device, use_channels_last


def candidate(options, steps_per_call, tf32=True, host_sync=False, keep_memory=True):
    """A callable running `steps_per_call` training steps under its own TF32 and glibc malloc settings
    (process-wide, so each call sets them before it runs)."""
    step = build_step("ours", options)

    def run():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        if options["device"] == "cpu":
            keep_freed_memory(keep_memory)
        for _ in range(steps_per_call):
            loss = step()
            if host_sync:
                loss.item()

    return run


def candidates(options, device, steps_per_call, with_compile):
    """{row name: callable}: the defaults, then one switch flipped per row."""
    rows = {"defaults": candidate(options, steps_per_call)}
    if device.type == "cuda":
        rows["amp off"] = candidate({**options, "amp": "off"}, steps_per_call)
        rows["amp off, TF32 off"] = candidate({**options, "amp": "off"}, steps_per_call, tf32=False)
    flipped = "off" if use_channels_last("auto", device, training=True) else "on"
    rows[f"channels_last {flipped}"] = candidate({**options, "channels_last": flipped}, steps_per_call)
    rows["host sync every step"] = candidate(options, steps_per_call, host_sync=True)
    if device.type == "cpu":
        rows["freed memory returned (glibc default)"] = candidate(options, steps_per_call, keep_memory=False)
    if with_compile:
        rows["compile"] = candidate({**options, "compile": True}, steps_per_call)
    return rows


def run(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_tflops, peak_note = harness.peak_tflops(args, device)
    header = harness.machine_header(device)
    print(header)
    options = dict(device=str(device), base_channels=args.base_channels, depth=args.depth,
                   image_size=args.image_size, batch_size=args.batch_size, amp="auto", channels_last="auto",
                   compile=False)
    times = harness.interleaved_times(candidates(options, device, args.steps_per_call, args.compile),
                                      args.repeats, device, args.warmup)
    flops_per_step = training_flops("ours", options)
    defaults = harness.median(times["defaults"]) / args.steps_per_call
    rows = []
    for name, seconds in times.items():
        per_step = harness.median(seconds) / args.steps_per_call
        tflops = flops_per_step / per_step / 1e12
        rows.append([name, f"{per_step:.4f}", f"{args.batch_size / per_step:.2f}", f"{per_step / defaults:.2f}x",
                     f"{tflops:.4g}", f"{100 * tflops / peak_tflops:.1f}%"])
    width, height = args.image_size
    body = (f"{args.batch_size} x {width}x{height}, UNet base {args.base_channels} depth {args.depth}; "
            f"{args.steps_per_call} step(s) per timed call, median of {args.repeats} interleaved calls after "
            f"{args.warmup} warm-up; peak {peak_tflops:.2f} TFLOP/s ({peak_note})\n\n")
    body += harness.format_table(["setting", "s/step", "img/s", "time vs defaults", "TFLOP/s", "% of peak"], rows)
    harness.report("fast_paths", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_step_arguments(parser)
    parser.add_argument("--steps_per_call", type=int, default=1,
                        help="training steps per timed call; > 1 lets the host run ahead of the GPU (default: 1)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.repeats, args.base_channels, args.depth, args.steps_per_call) < 1 \
            or args.warmup < 0:
        parser.error("--batch_size, --repeats, --base_channels, --depth and --steps_per_call must be >= 1, "
                     "--warmup >= 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
