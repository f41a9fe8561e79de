"""A roofline model of our training step on a GPU, computed without one: where the time must go, and the
MFU that eager mode and torch.compile's fusion could reach at best. A model, not a measurement.

    python -m bench.roofline                                  # classic U-Net, 32 x 512x256, H100 SXM figures
    python -m bench.roofline --batch_size 8 --record

The step (bf16 forward and backward of the UNet, float32 CE + Dice as CEDiceLoss computes it) runs on
fake tensors (shapes only) under a dispatch mode that sees every aten op: its FLOPs (torch's own FlopCounter
formulas) and the bytes of its tensor inputs and outputs (views move nothing and are skipped). Each op
is a kernel whose time is at least max(FLOPs / peak, bytes / memory bandwidth): tensor-core peak for
bf16/fp16 ops, the float32 (CUDA-core) peak for float32 ones. The fused AdamW adds 28 bytes per parameter
(read weight, grad and both moments, write weight and moments, all float32). Summed, that is a lower
bound on the eager step time, so eager MFU can be no higher than the printed ceiling (BatchNorm is
counted at one pass over its input and one over its output each way; cuDNN's make about 3 forward and
5 backward, so eager is a little worse still). The fused estimate is what torch.compile could reach at
best: convolutions stay cuDNN's, training-mode BatchNorm keeps a statistics pass and a normalising pass
each way (ReLU folded in: 3 passes forward, 5 backward), pooling, concatenation, the loss's softmax in
each direction and AdamW stay, every other element-wise op is fused into them. The convs alone bound any
schedule. Real kernels reach perhaps 60-80% of either peak, and launch overheads add to it: compare with
bench/fast_paths.py on a GPU.
"""
import argparse
from collections import defaultdict
from datetime import datetime

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from bench import harness
from losses import CEDiceLoss
from unet import UNet

NUM_CLASSES = 19
H100_SXM = dict(tensor_tflops=989.0, fp32_tflops=67.0, bandwidth_tbps=3.35)  # dense bf16, FP32 non-tensor, HBM3
ADAMW_BYTES_PER_PARAMETER = 28
# Traffic of each op, relative to eager, when torch.compile fuses the step as well as it could (see above);
# ops not listed are element-wise work fused into these.
FUSED_TRAFFIC = {"convolution": 1, "convolution_backward": 1,
                 "native_batch_norm": 3 / 2, "native_batch_norm_backward": 5 / 3,
                 "max_pool2d_with_indices": 1, "max_pool2d_with_indices_backward": 1, "cat": 1,
                 "_log_softmax": 1, "_log_softmax_backward_data": 1}
CONV_OPS = {"convolution", "convolution_backward"}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def tensor_bytes(values):
    return sum(value.numel() * value.element_size() for value in tree_flatten(values)[0]
               if isinstance(value, torch.Tensor))


class OpCosts(TorchDispatchMode):
    """Records (op name, FLOPs, bytes moved, output dtype) for every aten op that runs a kernel."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return out  # a view: no kernel, no bytes
        packet = func._overloadpacket
        outputs = [value for value in tree_flatten(out)[0] if isinstance(value, torch.Tensor)]
        if not outputs or packet.__name__ in ALLOCATIONS:
            return out  # a metadata query (prim.device) or a bare allocation: no kernel
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        dtype = outputs[0].dtype
        self.ops.append((packet.__name__, flops, tensor_bytes((args, kwargs)) + tensor_bytes(outputs), dtype))
        return out


def step_costs(batch_size, width, height, base_channels, depth):
    """OpCosts of one bf16 training step (forward, loss, backward) on fake tensors (shapes, no data, no
    compute), and the parameter count."""
    with FakeTensorMode():
        model = UNet(3, NUM_CLASSES, base_channels, depth)
        images = torch.empty(batch_size, 3, height, width)
        masks = torch.zeros(batch_size, height, width, dtype=torch.long)
        with OpCosts() as costs:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the fake tensors' device; the same op lists as CUDA's
                logits = model(images)
            CEDiceLoss(NUM_CLASSES)(logits, masks).backward()
    return costs.ops, sum(parameter.numel() for parameter in model.parameters())


def seconds(flops, nbytes, dtype, machine):
    peak = machine["tensor_tflops"] if dtype in (torch.bfloat16, torch.float16) else machine["fp32_tflops"]
    return max(flops / (peak * 1e12), nbytes / (machine["bandwidth_tbps"] * 1e12))


def run(args):
    machine = dict(H100_SXM, **{key: getattr(args, key) for key in H100_SXM if getattr(args, key) is not None})
    width, height = args.image_size
    ops, num_parameters = step_costs(args.batch_size, width, height, args.base_channels, args.depth)
    groups = defaultdict(lambda: [0, 0, 0, 0.0])  # kernels, FLOPs, bytes, seconds
    for name, flops, nbytes, dtype in ops:
        group = groups[name]
        group[0] += 1
        group[1] += flops
        group[2] += nbytes
        group[3] += seconds(flops, nbytes, dtype, machine)
    adamw_seconds = ADAMW_BYTES_PER_PARAMETER * num_parameters / (machine["bandwidth_tbps"] * 1e12)
    groups["fused AdamW (analytic)"] = [1, 0, ADAMW_BYTES_PER_PARAMETER * num_parameters, adamw_seconds]
    total_flops = sum(group[1] for group in groups.values())
    eager = sum(group[3] for group in groups.values())
    fused = adamw_seconds + sum(seconds(flops, nbytes * FUSED_TRAFFIC[name], dtype, machine)
                                for name, flops, nbytes, dtype in ops if name in FUSED_TRAFFIC)
    convs_only = sum(groups[name][3] for name in CONV_OPS)
    peak_time = total_flops / (machine["tensor_tflops"] * 1e12)
    rows = [[name, kernels, f"{flops / 1e9:.0f}", f"{nbytes / 1e9:.2f}", f"{time * 1e3:.2f}",
             f"{100 * time / eager:.1f}%"]
            for name, (kernels, flops, nbytes, time) in sorted(groups.items(), key=lambda item: -item[1][3])]
    shown, rest = rows[:args.top], rows[args.top:]
    if rest:
        shown.append([f"{len(rest)} other ops", sum(row[1] for row in rest), "", "", "",
                      f"{sum(float(row[5][:-1]) for row in rest):.1f}%"])
    body = (f"{args.batch_size} x {width}x{height}, UNet base {args.base_channels} depth {args.depth}, bf16 "
            f"step with float32 loss; model of a GPU with {machine['tensor_tflops']:.0f} TFLOP/s bf16, "
            f"{machine['fp32_tflops']:.0f} TFLOP/s float32, {machine['bandwidth_tbps']:.2f} TB/s "
            f"(H100 SXM unless overridden); {len(ops)} kernels, {total_flops / 1e12:.2f} TFLOP per step\n\n")
    body += harness.format_table(["op", "kernels", "GFLOP", "GB moved", "lower bound ms", "share"], shown)
    for label, time in (("every op its own kernel (eager)", eager), ("fused as well as torch.compile could", fused),
                        ("convs alone (no schedule can beat this)", convs_only)):
        body += (f"\n\n{label}: >= {time * 1e3:.1f} ms per step, <= {args.batch_size / time:.0f} img/s, "
                 f"MFU <= {100 * peak_time / time:.0f}%")
    header = (f"{datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, computed on fake tensors "
              "(a model, no measurement)")
    harness.report("roofline", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--image_size", type=harness.size_arg, default=(512, 256), help="WxH (default: 512x256)")
    parser.add_argument("--base_channels", type=int, default=64, help="UNet width (default: 64)")
    parser.add_argument("--depth", type=int, default=4, help="UNet depth (default: 4)")
    parser.add_argument("--tensor_tflops", type=float, help="bf16 tensor-core peak (default: 989, H100 SXM)")
    parser.add_argument("--fp32_tflops", type=float, help="float32 peak without tensor cores (default: 67)")
    parser.add_argument("--bandwidth_tbps", type=float, help="memory bandwidth in TB/s (default: 3.35)")
    parser.add_argument("--top", type=int, default=12, help="ops listed by name; the rest are summed (default: 12)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.base_channels, args.depth, args.top) < 1:
        parser.error("--batch_size, --base_channels, --depth and --top must be >= 1")
    overrides = (args.tensor_tflops, args.fp32_tflops, args.bandwidth_tbps)
    if any(value is not None and value <= 0 for value in overrides):
        parser.error("--tensor_tflops, --fp32_tflops and --bandwidth_tbps must be > 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
