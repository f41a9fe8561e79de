"""Memory-layout sweep: contiguous (NCHW) vs channels_last (NHWC) for our training step and for
inference, plus the inference settings that decide CPU speed (Conv+BatchNorm folding, batch size,
torch.compile), so training.py and inference.py can pick the fastest per device automatically.

    python -m bench.layout                                  # CPU, classic U-Net (base 64) at 512x256
    python -m bench.layout --device cuda --batch_sizes 8 32 --compile --record

Training: training.py's step (bench/train_step.py "ours") with --channels_last off vs on.
Inference: the forward pass as inference.Segmenter runs it, under inference_mode, for each layout, with and
without Conv+BatchNorm folded (torch.nn.utils.fusion.fuse_conv_bn_eval: eval-mode BatchNorm is an
affine map, so it folds into the conv weights and its memory pass disappears).
GFLOP/s = FLOPs counted by FlopCounterMode / median time; every group is timed round-robin.
"""
import argparse

import torch

from bench import harness
from bench.train_step import build_step, training_flops
from runtime import autocast_dtype, resolve_device, size_arg
from unet import UNet, fold_batchnorm

ISSUE_6_CPU_INFERENCE_GFLOPS = 130


def inference_runner(options, batch_size, channels_last, folded, device):
    torch.manual_seed(0)
    model = UNet(base_channels=options["base_channels"], depth=options["depth"]).eval()
    model = (fold_batchnorm(model) if folded else model).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if options["compile"]:
        model = torch.compile(model)
    width, height = options["image_size"]
    images = torch.randn(batch_size, 3, height, width, device=device).contiguous(memory_format=memory_format)
    amp_dtype = autocast_dtype("auto", device)

    @torch.inference_mode()
    def forward():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(images)

    return forward


def forward_flops(options, batch_size):
    width, height = options["image_size"]
    with torch.device("meta"):
        model = UNet(base_channels=options["base_channels"], depth=options["depth"]).eval()
        return harness.count_flops(lambda: model(torch.empty(batch_size, 3, height, width)))


def table(times, flops, batch_size):
    """Rows: name, s per call, img/s, GFLOP/s, time vs the fastest."""
    best = min(harness.median(seconds) for seconds in times.values())
    rows = []
    for name, seconds in times.items():
        median = harness.median(seconds)
        rows.append([name, f"{median:.3f}", f"{batch_size / median:.2f}", f"{flops / median / 1e9:.1f}",
                     f"{median / best:.2f}x"])
    return harness.format_table(["setting", "s/call", "img/s", "GFLOP/s", "time vs best"], rows)


def run(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = harness.machine_header(device)
    print(header)
    options = dict(device=str(device), base_channels=args.base_channels, depth=args.depth,
                   image_size=args.image_size, amp="auto", compile=args.compile)
    width, height = args.image_size
    body = (f"UNet base {args.base_channels} depth {args.depth} at {width}x{height}, compile {args.compile}, "
            f"median of {args.repeats} interleaved calls after {args.warmup} warm-up\n")
    for batch_size in args.batch_sizes:
        if not args.skip_training:
            steps = {f"train {layout}": build_step("ours", {**options, "batch_size": batch_size, "channels_last": flag})
                     for layout, flag in (("contiguous", "off"), ("channels_last", "on"))}
            times = harness.interleaved_times(steps, args.repeats, device, args.warmup)
            section = f"\nTraining step, batch {batch_size}:\n\n" + table(
                times, training_flops("ours", {**options, "batch_size": batch_size}), batch_size) + "\n"
            print(section)
            body += section
        forwards = {f"infer {layout}{' + folded BN' if folded else ''}":
                    inference_runner(options, batch_size, layout == "channels_last", folded, device)
                    for folded in (False, True) for layout in ("contiguous", "channels_last")}
        times = harness.interleaved_times(forwards, args.repeats, device, args.warmup)
        section = f"\nInference forward (inference_mode), batch {batch_size}:\n\n" + table(
            times, forward_flops(options, batch_size), batch_size) + "\n"
        print(section)
        body += section
    if device.type == "cpu" and args.base_channels == 64:
        body += f"\n(issue 6 CPU target: inference >= {ISSUE_6_CPU_INFERENCE_GFLOPS} GFLOP/s for base 64)\n"
    if args.record:
        harness.record("layout", header, body)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1], help="(default: 1)")
    parser.add_argument("--image_size", type=size_arg, default=(512, 256), help="WxH (default: 512x256)")
    parser.add_argument("--base_channels", type=int, default=64, help="UNet width (default: 64)")
    parser.add_argument("--depth", type=int, default=4, help="UNet depth (default: 4)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every candidate")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip_training", action="store_true", help="inference sweep only")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if min(args.batch_sizes + [args.repeats, args.base_channels, args.depth]) < 1 or args.warmup < 0:
        parser.error("--batch_sizes, --repeats, --base_channels and --depth must be >= 1, --warmup >= 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
