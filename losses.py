"""The training loss of the original project, `CrossEntropy + Dice`, with ignore_index honoured by both terms.

Both terms are computed in float32 even under autocast: softmax sums over the classes and the
Dice sums over every pixel of the batch, both too lossy in bf16/fp16. Everything is built from
a masked one-hot target, so there is no host sync (no .item(), no boolean indexing) and an
all-ignored batch gives loss 0 with zero gradients instead of F.cross_entropy's NaN.

Targets must hold class ids in [0, num_classes) or ignore_index. Checking that would need a
host sync on every step, so it is not done: any other value matches no class and is silently
treated like ignore_index (the dataset maps everything that is not a class to 255).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def logit_shift(class_weights, tau):
    """tau * log(class weight) per class (0 for a class of weight 0, whose log has no finite shift).

    Class weights in CE make rare classes learnable but bias the model towards predicting them: the weighted
    loss is minimised by probabilities proportional to weight * true probability. Adding this shift to the
    logits inside the loss, with the model's head bias started at minus it (training.py), trains like the
    plain weighted loss, step for step up to float rounding (biases have no weight decay and Adam's steps
    ignore a constant offset), but the model itself then outputs the weighted logits minus the shift: the
    fraction tau of the weights' bias removed for prediction. This is Menon et al.'s logit adjustment (ICLR
    2021) with the class weights as the inverse prior; tau = 1 removes the weights' bias entirely, 0 keeps it.
    """
    weights = torch.as_tensor(class_weights, dtype=torch.float32)
    return torch.where(weights > 0, tau * weights.clamp(min=torch.finfo(torch.float32).tiny).log(),
                       torch.zeros_like(weights))


class CEDiceLoss(nn.Module):
    """ce_weight * CE + dice_weight * (1 - soft Dice) + lovasz_weight * Lovasz-softmax.

    CE equals F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index):
    the (class-weighted) mean over valid pixels, and 0 when no pixel is valid. With ohem_threshold t > 0
    (online hard example mining, after mmsegmentation's OHEM sampler) the mean runs over the hard pixels
    only: those whose predicted probability of their own class is at most t, and at least the hardest
    tenth of the batch's pixels, so that the easy road and sky pixels stop diluting the thin objects.

    Dice is the soft multi-class Dice on softmax probabilities p against the one-hot target g,
    summed over the whole batch (all of N, H, W) per class c:
        dice_c = (2 * sum(p_c * g_c) + smooth) / (sum(p_c) + sum(g_c) + smooth)
    and the Dice loss is 1 - mean_c(dice_c), an unweighted mean: it already gives every class the same
    say whatever its size, so class_weights weigh the CE term only (weighting both lets the rare classes
    swamp the large ones).
    p and g are both zeroed at ignored pixels, so those count in neither numerator nor
    denominator. `smooth` keeps dice_c defined (= 1, i.e. no loss) for a class that is neither
    present nor predicted, and softens the gradient of rare classes.
    With dice_per_image the sums run over each image's pixels alone and the mean over every (image, class)
    pair (MONAI's default): the thin poles of one photo then weigh as much as the near ones of another,
    and a class predicted where it is absent costs that photo's whole pair.

    The Lovasz-softmax term (off by default; see lovasz_softmax) is a convex surrogate of the batch's
    1 - IoU, where the Dice term is one of 1 - F1: it costs a sort of every pixel for every class.

    logit_adjustment tau > 0 adds logit_shift(class_weights, tau) to the logits before every term, so the
    model learns logits with that shift taken out (see logit_shift).
    """

    def __init__(self, num_classes, ignore_index=255, ce_weight=1.0, dice_weight=1.0,
                 class_weights=None, smooth=1.0, ohem_threshold=0.0, lovasz_weight=0.0, logit_adjustment=0.0,
                 dice_per_image=False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"CEDiceLoss: num_classes must be >= 1, got {num_classes}")
        if smooth <= 0:
            raise ValueError(f"CEDiceLoss: smooth must be > 0 (else an absent class gives 0/0), got {smooth}")
        if lovasz_weight < 0:
            raise ValueError(f"CEDiceLoss: lovasz_weight must be >= 0, got {lovasz_weight}")
        if logit_adjustment < 0:
            raise ValueError(f"CEDiceLoss: logit_adjustment must be >= 0, got {logit_adjustment}")
        if not 0 <= ohem_threshold <= 1:
            raise ValueError(f"CEDiceLoss: ohem_threshold must be a probability in [0, 1], got {ohem_threshold}")
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (num_classes,):
                raise ValueError(f"CEDiceLoss: class_weights must have shape ({num_classes},), "
                                 f"got {tuple(class_weights.shape)}")
            if (class_weights < 0).any() or class_weights.sum() <= 0:
                raise ValueError("CEDiceLoss: class_weights must be >= 0 with a positive sum")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.lovasz_weight = lovasz_weight
        self.smooth = smooth
        self.ohem_threshold = ohem_threshold
        self.dice_sum_dims = (2, 3) if dice_per_image else (0, 2, 3)
        self.register_buffer("class_weights", class_weights, persistent=False)
        shift = logit_shift(class_weights, logit_adjustment) if logit_adjustment and class_weights is not None else None
        self.register_buffer("logit_shift", shift, persistent=False)

    def forward(self, logits, target):
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"CEDiceLoss: logits must be (N, {self.num_classes}, H, W), "
                             f"got {tuple(logits.shape)}")
        if target.shape != (logits.shape[0],) + logits.shape[2:] or target.is_floating_point():
            raise ValueError(f"CEDiceLoss: target must be integer (N, H, W) matching logits "
                             f"{tuple(logits.shape)}, got {target.dtype} {tuple(target.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            if self.logit_shift is not None:
                logits = logits + self.logit_shift.view(1, -1, 1, 1)
            log_probs = F.log_softmax(logits, dim=1)
            classes = torch.arange(self.num_classes, device=target.device).view(1, -1, 1, 1)
            onehot = (target.unsqueeze(1) == classes).float()  # ignored pixels: all zeros
            valid = onehot.sum(1, keepdim=True)  # (N, 1, H, W), 1 = pixel counts
            class_weights = (torch.ones(self.num_classes, device=logits.device)
                             if self.class_weights is None else self.class_weights)

            pixel_weight = (onehot * class_weights.view(1, -1, 1, 1)).sum(1)
            pixel_nll = -(onehot * log_probs).sum(1)
            if self.ohem_threshold:
                pixel_weight = pixel_weight * self.hard_pixels(pixel_nll.detach(), pixel_weight > 0)
            total_weight = pixel_weight.sum()
            safe_total = torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))
            ce = (pixel_weight * pixel_nll).sum() / safe_total

            probs = log_probs.exp() * valid
            intersection = (probs * onehot).sum(self.dice_sum_dims)
            cardinality = probs.sum(self.dice_sum_dims) + onehot.sum(self.dice_sum_dims)
            dice = (2 * intersection + self.smooth) / (cardinality + self.smooth)
            dice_loss = 1 - dice.mean()
            loss = self.ce_weight * ce + self.dice_weight * dice_loss
            if self.lovasz_weight:
                loss = loss + self.lovasz_weight * lovasz_softmax(probs, onehot, valid)
            return loss

    def hard_pixels(self, pixel_nll, counted):
        """1.0 where a counted pixel's probability of its own class is <= ohem_threshold or among the lowest
        tenth of the batch's pixels, else 0.0. The tenth is a fixed count of all pixels (mmsegmentation counts
        valid ones), so there is no host sync; pixels not counted (ignored, or of a class weighted 0) sort last
        and, when picked, carry no weight anyway."""
        own_probability = torch.exp(-pixel_nll).masked_fill(~counted, 2.0).flatten()
        tenth = own_probability.kthvalue(max(1, own_probability.numel() // 10)).values
        return (own_probability <= tenth.clamp(min=self.ohem_threshold)).view_as(pixel_nll).float()


def lovasz_softmax(probs, onehot, valid):
    """The Lovasz-softmax loss (Berman et al. 2018) over the whole batch, averaged over the classes present in
    the target. For class c, sort the pixels by error |g_c - p_c|, largest first; the loss is the sum of each
    error times the growth of the IoU loss |S| / (|G| + |S \\ G|) when that pixel joins the set S of pixels
    before it (G: the pixels of class c). It is the Lovasz extension of 1 - IoU, convex in the errors: for
    one-hot probs it is exactly 1 - IoU. probs and onehot are (N, C, H, W), zero at ignored pixels; valid is
    (N, 1, H, W), 1 = counted. Ignored pixels sort last, where the IoU loss has stopped growing, so they add
    nothing."""
    num_classes = probs.shape[1]
    errors = torch.where(valid > 0, (onehot - probs).abs(), -1.0).transpose(0, 1).reshape(num_classes, -1)
    errors, order = errors.sort(dim=1, descending=True)
    onehot = onehot.transpose(0, 1).reshape(num_classes, -1).gather(1, order)
    present = onehot.sum(1, keepdim=True)
    iou_loss = 1 - (present - onehot.cumsum(1)) / (present + (1 - onehot).cumsum(1))
    increments = torch.cat([iou_loss[:, :1], iou_loss[:, 1:] - iou_loss[:, :-1]], dim=1)
    per_class = (errors.clamp(min=0) * increments).sum(1)
    is_present = (present[:, 0] > 0).float()
    return (per_class * is_present).sum() / is_present.sum().clamp(min=1)


def median_frequency_weights(pixels, present_pixels):
    """Median-frequency balancing (Eigen & Fergus 2015; SegNet and ENet on CamVid): w_c = median(f) / f_c with
    f_c = pixels of class c / pixels of the images where c appears, so rare classes weigh more. Classes
    that never appear get weight 0 (there is nothing to learn them from)."""
    pixels = torch.as_tensor(pixels, dtype=torch.float64)
    present_pixels = torch.as_tensor(present_pixels, dtype=torch.float64)
    frequency = pixels / present_pixels.clamp(min=1)
    seen = frequency > 0
    if not seen.any():
        raise ValueError("median-frequency class weights: no class appears in the masks")
    weights = torch.zeros_like(frequency)
    weights[seen] = frequency[seen].quantile(0.5) / frequency[seen]
    return weights.float()
