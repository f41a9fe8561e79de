"""U-Net for semantic segmentation (Ronneberger et al., 2015), as in the seed project.

Each stage is a DoubleConv = (3x3 conv, BatchNorm, ReLU) x 2; the encoder halves the resolution
with 2x2 max-pooling, the decoder doubles it with a 2x2 transposed conv (or bilinear upsampling),
concatenates the encoder's skip and a 1x1 conv gives per-pixel class logits. The classic config
(base_channels=64, depth=4, transposed convs, 19 classes) has 31,038,803 parameters.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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


class UNet(nn.Module):
    """U-Net taking (N, in_channels, H, W) float images to (N, num_classes, H, W) logits, any H, W >= 1.

    Stage widths are base_channels * 2**i for i = 0..depth. With bilinear=True the bottleneck and
    every decoder stage but the last have half the channels (milesial layout, ~17 M parameters
    instead of ~31 M for the classic config).

    Dropout: the seed adds dropout for regularisation; here it is one Dropout2d on the bottleneck.
    The bottleneck holds most of the parameters and the most abstract features, where co-adaptation
    (overfitting) happens; the full-resolution skips are left intact because they carry the fine
    detail that object boundaries need. Dropout2d drops whole channels, since neighbouring pixels
    are so correlated that element-wise dropout barely regularises a conv feature map.

    Padding: the seed required H and W divisible by 16 (2**depth). forward() instead zero-pads the
    bottom and right edges up to the next multiple of 2**depth and crops the logits back. Zeros,
    because inputs are mean/std-normalised so 0 is the average colour, and it is the same value every
    3x3 conv already pads its borders with; reflect padding fails when the pad exceeds the image
    (e.g. 1x1 inputs), replicate smears edge pixels into stripes that look like structure.

    Initialisation: 3x3 convs (each followed by BatchNorm and ReLU) use Kaiming-normal in fan_out
    mode as in torchvision's ResNets; BatchNorm starts at weight 1, bias 0; the up-convs and the
    1x1 head keep PyTorch's defaults.

    Works under torch.autocast (bf16 on CPU and CUDA, fp16 on CUDA; the logits come out in the
    autocast dtype), with channels_last tensors, and under torch.compile (padding and cropping are
    plain F.pad and slicing). In train mode BatchNorm needs more than one value per channel at the
    bottleneck: N * ceil(H / 2**depth) * ceil(W / 2**depth) > 1.
    """

    def __init__(self, in_channels=3, num_classes=19, base_channels=64, depth=4, dropout=0.1, bilinear=False):
        super().__init__()
        self._config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                            depth=depth, dropout=dropout, bilinear=bilinear)
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
