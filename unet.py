"""The U-Net (Ronneberger et al., 2015) and its weights file: the model and everything needed to use it.

Each stage is (3x3 conv, BatchNorm, ReLU) x 2; the encoder halves the resolution with 2x2 max-pooling, the
decoder doubles it with a 2x2 transposed conv (or bilinear upsampling), concatenates the encoder's skip,
and a 1x1 conv gives per-pixel class logits. The classic config (base 64, depth 4, 19 classes) has
31,038,803 parameters.

The weights file (`save_weights` writes it, `load_weights` reads it, as nanoGPT's model.py owns its
checkpoints) holds the state_dict, the constructor arguments, the class names and colours, the training
size and the normalisation, so inference needs nothing but the file.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import DEFAULT_IMAGE_SIZE, UserError, autocast_dtype, load_torch_file, save_torch_file, use_channels_last

WEIGHTS_FILE = "unet_model.pth"  # training's --model_path and inference's --checkpoint by default
UPSAMPLE_BYTES = 256 * 2**20  # upper bound on the float32 logits upsample_argmax holds at once


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2; the convs have no bias because BatchNorm's shift replaces it."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample 2x, concatenate the encoder skip, DoubleConv.

    A transposed conv halves the channels while upsampling; bilinear upsampling keeps them and the
    DoubleConv's first conv does the halving instead (milesial/Pytorch-UNet layout).
    """

    def __init__(self, in_channels, out_channels, bilinear):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.conv = DoubleConv(in_channels, out_channels, mid_channels=in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


INPUT_NORMS = ("dataset", "photo")


PHOTO_STD_FLOOR = 0.05  # about 3 grey levels after the dataset's normalisation: a blank frame's noise stays noise


def standardise_photos(x):
    """(N, C, H, W) -> each photo minus its own mean, divided by its own standard deviation (over all its pixels and
    channels, at least PHOTO_STD_FLOOR): a photo twice as bright or with half the contrast gives the same input, so
    exposure does not matter; colour differences between channels are kept."""
    mean = x.mean((1, 2, 3), keepdim=True)
    std = x.std((1, 2, 3), keepdim=True, correction=0).clamp_min(PHOTO_STD_FLOOR)
    return (x - mean) / std


class UNet(nn.Module):
    """(N, in_channels, H, W) float images -> (N, num_classes, H, W) logits, for any H, W >= 1.

    Stage widths are base_channels * 2**i for i = 0..depth; bilinear=True halves the bottleneck and the
    decoder (milesial's layout, ~17 M instead of ~31 M parameters for the classic config). One Dropout2d sits
    on the bottleneck, where most parameters are; the skips keep the fine detail that boundaries need.
    input_norm="photo" first standardises each photo by its own statistics (standardise_photos).
    forward() zero-pads the bottom and right edges to a multiple of 2**depth and crops the logits back
    (the original project needed sizes divisible by 16): zero is the mean colour after normalisation, and what every
    3x3 conv pads with. In train mode BatchNorm needs N * ceil(H / 2**depth) * ceil(W / 2**depth) > 1.
    """

    def __init__(self, in_channels=3, num_classes=19, base_channels=64, depth=4, dropout=0.1, bilinear=False,
                 input_norm="dataset"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {input_norm!r}: expected one of {', '.join(INPUT_NORMS)}")
        self._config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                            depth=depth, dropout=dropout, bilinear=bilinear, input_norm=input_norm)
        widths = [base_channels * 2**i for i in range(depth + 1)]
        halve = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i - 1], widths[i] // (halve if i == depth else 1)))
            for i in range(1, depth + 1)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.ups = nn.ModuleList(
            Up(widths[i], widths[i - 1] // (halve if i > 1 else 1), bilinear) for i in range(depth, 0, -1)
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        # Kaiming-normal (fan_out) for the 3x3 convs that feed BatchNorm + ReLU, as torchvision's ResNets
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def config(self):
        """The constructor arguments, so a checkpoint can rebuild the model with UNet(**config)."""
        return dict(self._config)

    def forward(self, x):
        in_channels = self._config["in_channels"]
        if x.ndim != 4 or x.shape[1] != in_channels or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"UNet expects input of shape (N, {in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"UNet expects a floating-point (normalised) input, got {x.dtype}")
        if self._config["input_norm"] == "photo":
            x = standardise_photos(x)
        height, width = x.shape[-2:]
        multiple = 2 ** self._config["depth"]
        x = F.pad(x, (0, -width % multiple, 0, -height % multiple))
        return self.forward_unpadded(x)[..., :height, :width]

    def forward_unpadded(self, x):
        """The bare network: H and W must already be multiples of 2**depth (forward() ensures it)."""
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


def upsample_argmax(logits, size):
    """(C, h, w) logits -> (H, W) int64 class map at `size`: bilinear upsampling of the logits, then argmax.
    Classes are upsampled in chunks of at most UPSAMPLE_BYTES with a running max, which gives exactly the
    full argmax (ties keep the lowest class, like torch.argmax) without holding C full-size maps at once."""
    height, width = size
    logits = logits.float().contiguous()  # a channels_last input would make both steps several times slower
    chunk = max(1, UPSAMPLE_BYTES // (4 * height * width))
    best_score = best_class = None
    for start in range(0, logits.shape[0], chunk):
        scores = F.interpolate(logits[None, start:start + chunk], size=size, mode="bilinear", align_corners=False)[0]
        score, label = scores.max(0)
        label += start
        if best_score is None:
            best_score, best_class = score, label
        else:
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_class = torch.where(better, label, best_class)
    return best_class


def upsample_confidence(scores, size, probabilities=False):
    """(C, h, w) logits (or, with probabilities=True, class probabilities) -> (H, W) float32 probability of the
    top class at `size`: the softmax of the bilinearly upsampled logits, as upsample_argmax picks its class.
    Chunked like upsample_argmax (a running max, then a running sum of exp(logit - max)), so big photos fit."""
    height, width = size
    scores = scores.float().contiguous()
    chunk = max(1, UPSAMPLE_BYTES // (4 * height * width))

    def chunks():
        for start in range(0, scores.shape[0], chunk):
            yield F.interpolate(scores[None, start:start + chunk], size=size, mode="bilinear", align_corners=False)[0]

    top = None
    for upsampled in chunks():
        top = upsampled.amax(0) if top is None else torch.maximum(top, upsampled.amax(0))
    if probabilities:
        return top
    total = sum((upsampled - top).exp().sum(0) for upsampled in chunks())
    return 1 / total


def mask_and_confidence(scores, size, probabilities=False, confidence=False):
    """(C, h, w) class scores -> the uint8 (H, W) mask at `size` and, with confidence=True, the top class's
    probability as 8-bit gray (255 = 1.0), else None; probabilities says the scores are probabilities already."""
    mask = upsample_argmax(scores, size).byte().cpu().numpy()
    if not confidence:
        return mask, None
    gray = (upsample_confidence(scores, size, probabilities) * 255).round().clamp(0, 255)
    return mask, gray.byte().cpu().numpy()


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm into the conv before it, in place: the same function with one pass
    over each feature map fewer. For inference only (the folded model cannot train)."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, norm = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
                    module[index] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
                    module[index + 1] = nn.Identity()
    return model


TTA_SCALES = {"none": (1.0,), "flip": (1.0,), "ms": (0.75, 1.0, 1.25)}


class Predictor:
    """A model as inference runs it, for inference.py and training's evaluation alike, so that both score the same
    numbers: BatchNorm folded into `model` (in place), eval mode, inference's precision (--amp) and memory layout
    (--channels_last) on `device`, and optional test-time augmentation (tta: none, flip or ms)."""

    def __init__(self, model, device, amp="auto", channels_last="auto", tta="none"):
        if tta not in TTA_SCALES:
            raise UserError(f"--tta {tta}: expected one of {', '.join(TTA_SCALES)}")
        self.device, self.tta = device, tta
        self.amp_dtype = autocast_dtype(amp, device, training=False)
        self.channels_last = use_channels_last(channels_last, device, training=False)
        model = fold_batchnorm(model.eval()).to(device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) model inputs -> (N, C, h, w) float32 logits."""
        inputs = inputs.to(self.device, non_blocking=True)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.model(inputs).float()

    @torch.inference_mode()
    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) model inputs -> (N, C, h, w) class scores: the logits, or with test-time augmentation the
        softmax probabilities averaged over the inputs and their mirror images (flip), at 0.75x, 1x and 1.25x
        the training size (ms)."""
        if self.tta == "none":
            return self.logits(inputs)
        size, total = inputs.shape[-2:], 0
        for scale in TTA_SCALES[self.tta]:
            scaled = inputs if scale == 1 else F.interpolate(inputs, scale_factor=scale, mode="bilinear",
                                                             align_corners=False, antialias=scale < 1)
            for mirrored in (False, True):
                probabilities = self.logits(scaled.flip(-1) if mirrored else scaled).softmax(1)
                probabilities = probabilities.flip(-1) if mirrored else probabilities
                total += F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False) \
                    if scale != 1 else probabilities
        return total / (2 * len(TTA_SCALES[self.tta]))


# ----------------------------------------------------------------------------- the weights file

@dataclass
class TrainedModel:
    """A model rebuilt from a weights file, with what its inputs and outputs mean. class_colors and dataset
    are None for files that do not record them (bare state_dicts, files of earlier versions)."""

    model: UNet
    class_names: list
    class_colors: list | None
    image_size: tuple
    mean: tuple
    std: tuple
    dataset: str | None


def weights_dict(model, class_names, class_colors, image_size, mean, std, dataset):
    """The weights file's contents (a training checkpoint holds them too); refuses non-finite weights."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite weights ({', '.join(bad[:3])})")
    return {"model": state, "model_config": model.config, "class_names": list(class_names),
            "class_colors": [[int(c) for c in color] for color in class_colors], "image_size": list(image_size),
            "mean": list(mean), "std": list(std), "dataset": dataset, "torch_version": str(torch.__version__)}


def save_weights(path, model, **info):
    """Write the weights file (atomically); `info` as weights_dict takes it."""
    save_torch_file(weights_dict(model, **info), path)


def load_weights(path, fixed=None, class_names=None, fallback_size=DEFAULT_IMAGE_SIZE, mean=None, std=None):
    """Rebuild the model a weights file (or a training checkpoint) describes.

    A bare state_dict (also one saved from a torch.compile'd or DDP model) knows no classes, size or
    normalisation: `class_names`, `fallback_size`, `mean` and `std` supply them, and `fixed` pins any of
    num_classes, base_channels, depth, bilinear that the parameter shapes cannot tell, and input_norm, which they
    never tell (default "dataset").
    """
    contents = load_torch_file(path)
    if not isinstance(contents, dict) or not contents:
        raise UserError(f"checkpoint {path} holds a {type(contents).__name__}, not a model")
    if "model" in contents and "model_config" in contents:
        state_dict, config = contents["model"], contents["model_config"]
        class_names = contents.get("class_names", class_names)
        info = dict(class_colors=contents.get("class_colors"), image_size=tuple(contents.get("image_size", fallback_size)),
                    mean=tuple(contents.get("mean", mean)), std=tuple(contents.get("std", std)),
                    dataset=contents.get("dataset"))
    elif all(isinstance(value, torch.Tensor) for value in contents.values()):
        state_dict = dict(contents)
        for prefix in ("_orig_mod.", "module."):
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, prefix)
        try:
            config = config_from_state_dict(state_dict, fixed or {})
        except ValueError as error:
            raise UserError(f"bare state_dict {path}: {error}") from None
        info = dict(class_colors=None, image_size=tuple(fallback_size), mean=tuple(mean), std=tuple(std), dataset=None)
    else:
        raise UserError(f"checkpoint {path} is neither a weights file of training.py nor a state_dict "
                        f"(keys: {', '.join(map(str, list(contents)[:6]))})")
    if class_names is None or len(class_names) != config["num_classes"]:
        given = "no class names" if class_names is None else f"{len(class_names)} class names"
        raise UserError(f"checkpoint {path}: {given} for a {config['num_classes']}-class model: pass --classes")
    model = UNet(**config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"checkpoint {path}: weights do not fit its model_config ({detail[:300]})") from None
    return TrainedModel(model.eval(), list(class_names), **info)


def config_from_state_dict(state_dict, fixed):
    """The UNet constructor arguments whose parameter shapes equal the state_dict's.

    in_channels and base_channels come from the first conv, num_classes from the head (the last conv);
    depth and bilinear from building each candidate on the meta device (no memory) and comparing every key
    and shape. `fixed` holds the sizes given on the command line (missing or None = infer).
    """
    conv_weights = [tensor for tensor in state_dict.values() if tensor.ndim == 4]
    if not conv_weights:
        raise ValueError("no conv weights in the state_dict: not a U-Net")
    base_channels = fixed.get("base_channels") or conv_weights[0].shape[0]
    num_classes = fixed.get("num_classes") or conv_weights[-1].shape[0]
    in_channels = conv_weights[0].shape[1]
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    for depth in [fixed["depth"]] if fixed.get("depth") else range(1, 9):
        for bilinear in [fixed["bilinear"]] if fixed.get("bilinear") is not None else [False, True]:
            with torch.device("meta"):
                candidate = UNet(in_channels, num_classes, base_channels, depth, bilinear=bilinear,
                                 input_norm=fixed.get("input_norm") or "dataset")
            if {key: tuple(tensor.shape) for key, tensor in candidate.state_dict().items()} == shapes:
                return candidate.config
    raise ValueError("its shapes match no U-Net; pass --num_classes, --base_channels, --depth and --bilinear")
