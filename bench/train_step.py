"""Training-step speed: our step (training.py) vs a textbook step vs segmentation_models_pytorch's U-Net.

    python -m bench.train_step                                   # CPU, classic U-Net at 512x256, batch 1
    python -m bench.train_step --device cuda --batch_size 32 --compile --record

Candidates, timed round-robin in one run (median of --repeats):
- ours:     training.py's own train_step, build_optimizer (fused AdamW), autocast choice (bf16
            on CUDA, off on CPU), backend settings (cuDNN benchmark, TF32) and the auto channels_last
            rule; the UNet and losses.CEDiceLoss; --compile compiles model and loss as --compile does there.
- textbook: the same UNet trained the way a tutorial writes it: fp32, NCHW, F.cross_entropy plus a
            one-hot soft Dice, plain for-loop AdamW, `.item()` on every step.
- smp:      segmentation_models_pytorch.Unet(resnet34, random init, 19 classes), with our step, so the
            row compares networks, not training loops.
FLOPs are counted once per candidate with FlopCounterMode on the meta device (free); achieved
TFLOP/s = FLOPs / median step time; % of peak uses --peak_tflops (default: H100 dense bf16 on CUDA,
an AVX2 fp32 estimate on CPU, printed).
"""
import argparse
import itertools
import types

import torch
import torch.nn.functional as F

from bench import harness
import training
from config import TrainConfig
from dataset import IGNORE_INDEX
from losses import CEDiceLoss
from lr_schedule import WarmupInverseSqrtLR
from runtime import resolve_device
from unet import UNet

NUM_CLASSES = 19
CANDIDATES = ("ours", "textbook", "smp")


def build_network(name, options):
    if name == "smp":
        import segmentation_models_pytorch as smp  # bench-only dependency (bench/requirements.txt)

        return smp.Unet("resnet34", encoder_weights=None, classes=NUM_CLASSES)
    return UNet(3, NUM_CLASSES, options["base_channels"], options["depth"])


def make_batch(options, device):
    """A fixed random batch: images (N, 3, H, W) and masks with ~5% ignored pixels."""
    generator = torch.Generator().manual_seed(0)
    width, height = options["image_size"]
    images = torch.randn(options["batch_size"], 3, height, width, generator=generator)
    masks = torch.randint(0, NUM_CLASSES, (options["batch_size"], height, width), generator=generator)
    masks[torch.rand(masks.shape, generator=generator) < 0.05] = IGNORE_INDEX
    return images.to(device), masks.to(device)


def textbook_loss(logits, masks):
    """CE + soft Dice as a tutorial writes it (boolean masks, F.one_hot), the reference for CEDiceLoss."""
    valid = masks != IGNORE_INDEX
    ce = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
    probs = logits.softmax(1) * valid[:, None]
    onehot = F.one_hot(masks * valid, NUM_CLASSES).permute(0, 3, 1, 2).float() * valid[:, None]
    intersection = (probs * onehot).sum((0, 2, 3))
    cardinality = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return ce + 1 - ((2 * intersection + 1) / (cardinality + 1)).mean()


def our_config(options):
    """training.py's defaults with the bench's model and speed flags (those `options` sets)."""
    keys = ("device", "base_channels", "depth", "amp", "channels_last", "compile", "cudnn_benchmark")
    return TrainConfig(**{key: options[key] for key in keys if key in options})


def build_step(name, options):
    """A callable running one training step of candidate `name`; used in process and by the memory probe."""
    device = torch.device(options["device"])
    images, masks = make_batch(options, device)
    torch.manual_seed(0)
    if name == "textbook":
        model = build_network(name, options).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)

        def textbook_step():
            optimizer.zero_grad()
            loss = textbook_loss(model(images), masks)
            loss.backward()
            optimizer.step()
            return loss.item()

        return textbook_step

    config = our_config(options)
    device, amp_dtype, memory_format = training.setup_device(config, 0)
    if name == "ours":
        model, optimizer, scheduler, scaler = training.build_training(config, NUM_CLASSES, device, memory_format,
                                                                      amp_dtype)
    else:  # another network through our loop: build_training's steps, for a model it does not build
        model = build_network(name, options).to(device, memory_format=memory_format)
        optimizer = training.build_optimizer(model, config)
        scheduler = WarmupInverseSqrtLR(optimizer, config.warmup_steps, config.decay_factor, config.min_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model.train()
    loss_fn = CEDiceLoss(NUM_CLASSES, IGNORE_INDEX, config.ce_weight, config.dice_weight).to(device)
    loss_fn = training.compiled(loss_fn, config)
    step_model = training.compiled(model, config)
    batches = itertools.repeat((images, masks))

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    step = types.SimpleNamespace(step_model=step_model, data=types.SimpleNamespace(train=batches), step_loss_fn=loss_fn,
                                 config=types.SimpleNamespace(accum_steps=1, grad_clip=config.grad_clip),
                                 optimizer=optimizer, scaler=scaler, autocast=autocast, device=device,
                                 memory_format=memory_format)  # what train_step reads of a training.Run

    def our_step():
        loss, _, _ = training.train_step(step)
        scheduler.step()
        return loss

    return our_step


def training_flops(name, options):
    """FLOPs of one forward + backward pass at the bench's batch, counted on the meta device."""
    width, height = options["image_size"]
    with torch.device("meta"):
        model = build_network(name, options)
        images = torch.empty(options["batch_size"], 3, height, width)
        masks = torch.zeros(options["batch_size"], height, width, dtype=torch.long)
        return harness.count_flops(lambda: textbook_loss(model(images), masks).backward())


def run(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(device=str(device), base_channels=args.base_channels, depth=args.depth,
                   image_size=args.image_size, batch_size=args.batch_size, amp=args.amp,
                   channels_last=args.channels_last, compile=args.compile,
                   cudnn_benchmark=args.cudnn_benchmark == "on")
    peak_tflops, peak_note = harness.peak_tflops(args, device)
    header = harness.machine_header(device)
    print(header)
    print(f"peak for % of peak: {peak_tflops:.2f} TFLOP/s ({peak_note})")
    steps = {name: build_step(name, options) for name in args.candidates}
    times = harness.interleaved_times(steps, args.repeats, device, args.warmup)
    rows = []
    ours = harness.median(times["ours"]) if "ours" in times else None
    for name in args.candidates:
        seconds = harness.median(times[name])
        tflops = training_flops(name, options) / seconds / 1e12
        memory = "-" if args.skip_memory else f"{harness.peak_memory_mib(build_step, (name, options), device):.1f}"
        rows.append([name, f"{seconds:.3f}", f"{args.batch_size / seconds:.2f}",
                     f"{seconds / ours:.2f}x" if ours else "-", f"{tflops:.4g}",
                     f"{100 * tflops / peak_tflops:.1f}%", memory])
    width, height = args.image_size
    body = (f"{args.batch_size} x {width}x{height}, UNet base {args.base_channels} depth {args.depth}, amp "
            f"{args.amp}, channels_last {args.channels_last}, compile {args.compile}, cudnn.benchmark "
            f"{args.cudnn_benchmark}; median of {args.repeats} "
            f"interleaved steps; peak {peak_tflops:.2f} TFLOP/s ({peak_note})\n\n")
    body += harness.format_table(["candidate", "s/step", "img/s", "time vs ours", "TFLOP/s", "% of peak",
                                  "peak mem MiB"], rows)
    harness.report("train_step", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_step_arguments(parser)
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="ours: autocast, as training.py --amp (default: auto)")
    parser.add_argument("--channels_last", choices=["auto", "on", "off"], default="auto",
                        help="ours: memory format, as training.py --channels_last (default: auto)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile model and loss, as training.py")
    parser.add_argument("--cudnn_benchmark", choices=["on", "off"], default="on",
                        help="ours: training.py --cudnn_benchmark; CUDA only (default: on)")
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES),
                        help="what to time (default: all)")
    parser.add_argument("--skip_memory", action="store_true", help="skip the peak-memory probe (one step each)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.repeats, args.base_channels, args.depth) < 1 or args.warmup < 0:
        parser.error("--batch_size, --repeats, --base_channels and --depth must be >= 1, --warmup >= 0")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
