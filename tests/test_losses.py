import math

import pytest
import torch
import torch.nn.functional as F

from losses import CEDiceLoss, logit_shift, lovasz_softmax, median_frequency_weights

IGNORE = 255


def random_batch(seed=0, n=2, c=5, h=6, w=7, ignore_fraction=0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen) * 3
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < ignore_fraction] = IGNORE
    return logits, target


def hand_example():
    """Three pixels, two classes: (2, 0) labelled 0, (0, 1) labelled 1, (5, -5) ignored."""
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])
    target = torch.tensor([[[0, 1, IGNORE]]])
    p0_class0 = math.exp(2) / (math.exp(2) + 1)  # pixel 0
    p1_class1 = math.exp(1) / (math.exp(1) + 1)  # pixel 1
    return logits, target, p0_class0, p1_class1


def test_hand_computed_dice_ignores_third_pixel():
    logits, target, a, b = hand_example()
    # class 0: p = a at pixel 0 (its pixel) and 1 - b at pixel 1; g sums to 1
    dice0 = (2 * a + 1) / (a + (1 - b) + 1 + 1)
    # class 1: p = 1 - a at pixel 0 and b at pixel 1 (its pixel)
    dice1 = (2 * b + 1) / ((1 - a) + b + 1 + 1)
    loss = CEDiceLoss(2, ce_weight=0.0, smooth=1.0)(logits, target)
    assert loss.item() == pytest.approx(1 - (dice0 + dice1) / 2, abs=1e-6)

    # class weights weigh the CE term only: the Dice term is the plain class mean whatever they are
    weighted = CEDiceLoss(2, ce_weight=0.0, class_weights=[3.0, 1.0])(logits, target)
    assert weighted.item() == pytest.approx(1 - (dice0 + dice1) / 2, abs=1e-6)


def test_hand_computed_ce_and_sum():
    logits, target, a, b = hand_example()
    ce = -(math.log(a) + math.log(b)) / 2
    assert CEDiceLoss(2, dice_weight=0.0)(logits, target).item() == pytest.approx(ce, abs=1e-6)
    weighted_ce = -(3 * math.log(a) + 1 * math.log(b)) / 4
    loss = CEDiceLoss(2, dice_weight=0.0, class_weights=[3.0, 1.0])(logits, target)
    assert loss.item() == pytest.approx(weighted_ce, abs=1e-6)

    dice_loss = CEDiceLoss(2, ce_weight=0.0)(logits, target).item()
    total = CEDiceLoss(2, ce_weight=0.5, dice_weight=2.0)(logits, target).item()
    assert total == pytest.approx(0.5 * ce + 2.0 * dice_loss, abs=1e-6)


@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 1.0, 0.0, 3.0]])
def test_ce_matches_torch_cross_entropy(class_weights):
    logits, target = random_batch()
    weight = None if class_weights is None else torch.tensor(class_weights)
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    got = CEDiceLoss(5, dice_weight=0.0, class_weights=class_weights)(logits, target)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ce_weight, dice_weight", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_logits_at_ignored_pixels_do_not_matter(ce_weight, dice_weight):
    logits, target = random_batch(seed=1)
    criterion = CEDiceLoss(5, ce_weight=ce_weight, dice_weight=dice_weight, class_weights=[1, 2, 3, 4, 5])
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    changed = logits.clone()
    changed[ignored] = torch.randn(int(ignored.sum())) * 50

    original = logits.requires_grad_()
    loss = criterion(original, target)
    loss.backward()
    assert torch.equal(loss, criterion(changed, target))
    assert torch.count_nonzero(original.grad[ignored]) == 0
    assert torch.count_nonzero(original.grad[~ignored]) > 0


def test_all_ignored_batch_is_zero_with_zero_grads():
    logits, _ = random_batch()
    logits.requires_grad_()
    target = torch.full((2, 6, 7), IGNORE)
    loss = CEDiceLoss(5, class_weights=[1, 2, 3, 4, 5])(logits, target)
    loss.backward()
    assert torch.isnan(F.cross_entropy(logits.detach(), target, ignore_index=IGNORE))  # why we roll our own
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_perfect_prediction_is_near_zero_and_wrong_is_large():
    _, target = random_batch(ignore_fraction=0.0)
    perfect = F.one_hot(target, 5).permute(0, 3, 1, 2).float() * 100
    criterion = CEDiceLoss(5)
    assert criterion(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert criterion(-perfect, target).item() > 50


def test_bf16_autocast_gives_float32_equal_to_fp32_on_rounded_logits():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    images = torch.randn(2, 3, 6, 7)
    _, target = random_batch()
    criterion = CEDiceLoss(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(images)
        loss = criterion(logits, target)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    reference = criterion(logits.detach().float(), target)
    assert torch.equal(loss, reference)

    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_gradients_finite_on_extreme_logits():
    logits, target = random_batch()
    logits = (logits * 1e4).requires_grad_()
    loss = CEDiceLoss(5)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_class_weights_are_float32_and_not_checkpointed():
    criterion = CEDiceLoss(3, class_weights=[1.0, 2.0, 3.0])
    assert criterion.class_weights.dtype == torch.float32
    assert criterion.state_dict() == {}


def test_dice_per_image_by_hand_and_as_the_mean_of_one_image_batches():
    logits, target = random_batch(seed=3, n=3)
    probs = logits.softmax(1).numpy()
    valid = (target != IGNORE).numpy()
    expected = []
    for n in range(3):
        for c in range(5):
            p = probs[n, c] * valid[n]
            g = (target[n] == c).numpy()
            expected.append((2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1))
    per_image = CEDiceLoss(5, ce_weight=0.0, dice_per_image=True)(logits, target)
    assert per_image.item() == pytest.approx(1 - sum(expected) / len(expected), abs=1e-6)
    one_image_batches = [CEDiceLoss(5, ce_weight=0.0)(logits[n:n + 1], target[n:n + 1]) for n in range(3)]
    torch.testing.assert_close(per_image, torch.stack(one_image_batches).mean())
    batch = CEDiceLoss(5, ce_weight=0.0)(logits, target)
    assert abs(batch.item() - per_image.item()) > 1e-3  # on a batch of several images it is another loss
    ce_only = CEDiceLoss(5, dice_weight=0.0)
    assert CEDiceLoss(5, dice_weight=0.0, dice_per_image=True)(logits, target).item() == ce_only(logits, target).item()


def hard_pixel_ce(logits, target, weights, threshold):
    """Reference OHEM CE by hand: keep the counted pixels (valid, of a class weighted > 0) with p(own class) <=
    max(threshold, the tenth-lowest p), with p = 2 elsewhere (never kept unless fewer than a tenth count)."""
    probs = logits.softmax(1)
    counted = (target != IGNORE) & (torch.tensor(weights + [0.0])[target.clamp(max=5)] > 0)
    own = torch.where(counted, probs.gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1), 2.0)
    cutoff = max(threshold, sorted(own.flatten().tolist())[own.numel() // 10 - 1])
    keep = (own <= cutoff) & counted
    kept_target = torch.where(keep, target, IGNORE)
    return F.cross_entropy(logits, kept_target, weight=torch.tensor(weights), ignore_index=IGNORE), int(keep.sum())


@pytest.mark.parametrize("threshold", [0.7, 0.2, 1e-9])
def test_ohem_ce_averages_over_the_hard_pixels_only(threshold):
    logits, target = random_batch(seed=3, n=2, h=10, w=10)
    weights = [0.5, 2.0, 1.0, 0.0, 3.0]
    expected, kept = hard_pixel_ce(logits, target, weights, threshold)
    got = CEDiceLoss(5, dice_weight=0.0, class_weights=weights, ohem_threshold=threshold)(logits, target)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    counted = int(((target != IGNORE) & (target != 3)).sum())  # class 3 weighs 0: it never fills the quota
    assert target.numel() // 10 <= kept < counted  # even at 0.7 some pixels are easy
    if threshold == 1e-9:  # nothing is that sure of itself: exactly the hardest tenth
        assert kept == target.numel() // 10


def test_ohem_keeps_every_pixel_when_fewer_than_a_tenth_count_and_is_zero_when_none_do():
    logits, target = random_batch(seed=4, ignore_fraction=0.95)
    assert 0 < int((target != IGNORE).sum()) < target.numel() // 10
    plain = CEDiceLoss(5, dice_weight=0.0)(logits, target)
    torch.testing.assert_close(CEDiceLoss(5, dice_weight=0.0, ohem_threshold=1e-9)(logits, target), plain)
    logits.requires_grad_()
    loss = CEDiceLoss(5, ohem_threshold=0.7)(logits, torch.full_like(target, IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_ohem_at_threshold_one_is_plain_ce_and_leaves_dice_alone():
    logits, target = random_batch()
    plain = CEDiceLoss(5, class_weights=[1, 2, 3, 4, 5])(logits, target)
    assert torch.equal(CEDiceLoss(5, class_weights=[1, 2, 3, 4, 5], ohem_threshold=1.0)(logits, target), plain)
    dice_only = CEDiceLoss(5, ce_weight=0.0)(logits, target)
    assert torch.equal(CEDiceLoss(5, ce_weight=0.0, ohem_threshold=0.7)(logits, target), dice_only)


def lovasz_by_sets(probs, target, num_classes):
    """The Lovasz extension of the IoU loss written out with Python sets, one class at a time: the pixels
    sorted by error, each weighted by how much the IoU loss |S| / |G | S| grows when it joins S."""
    pixels = [(index, label) for index, label in enumerate(target.flatten().tolist()) if label != IGNORE]
    flat = probs.permute(1, 0, 2, 3).reshape(num_classes, -1)
    losses = []
    for c in range(num_classes):
        members = {index for index, label in pixels if label == c}
        if not members:
            continue
        errors = {index: abs((label == c) - flat[c, index].item()) for index, label in pixels}
        chosen, previous, total = set(), 0.0, 0.0
        for index in sorted(errors, key=errors.get, reverse=True):
            chosen.add(index)
            iou_loss = len(chosen) / len(members | chosen)
            total += errors[index] * (iou_loss - previous)
            previous = iou_loss
        losses.append(total)
    return sum(losses) / len(losses)


def lovasz_inputs(logits, target):
    classes = torch.arange(logits.shape[1]).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).float()
    valid = onehot.sum(1, keepdim=True)
    return logits.softmax(1) * valid, onehot, valid


def test_lovasz_softmax_matches_its_definition_written_with_sets():
    logits, target = random_batch(seed=5, n=2, c=4, h=5, w=6)
    target[target == 3] = 2  # class 3 absent: it is left out of the mean
    expected = lovasz_by_sets(logits.softmax(1), target, 4)
    got = lovasz_softmax(*lovasz_inputs(logits, target))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_lovasz_softmax_of_one_hot_predictions_is_one_minus_the_iou_of_the_present_classes():
    gen = torch.Generator().manual_seed(6)
    predicted = torch.randint(0, 5, (2, 8, 9), generator=gen)
    target = torch.randint(0, 3, (2, 8, 9), generator=gen)  # classes 3 and 4 absent (but predicted)
    target[:, 0] = IGNORE
    counted = target != IGNORE
    ious = [((predicted == c) & (target == c)).sum() / (((predicted == c) | (target == c)) & counted).sum()
            for c in range(3)]
    _, onehot, valid = lovasz_inputs(torch.zeros(2, 5, 8, 9), target)
    hard = F.one_hot(predicted, 5).permute(0, 3, 1, 2).float() * valid
    assert lovasz_softmax(hard, onehot, valid).item() == pytest.approx(1 - sum(ious).item() / 3, abs=1e-6)


def test_lovasz_softmax_gradient_matches_finite_differences():
    logits, target = random_batch(seed=8, n=2, c=4, h=4, w=5)
    _, onehot, valid = lovasz_inputs(logits, target)
    probs = logits.double().softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: lovasz_softmax(p * valid, onehot.double(), valid.double()), (probs,))


def test_lovasz_term_adds_to_the_loss_and_ignores_void_pixels():
    logits, target = random_batch(seed=7)
    plain = CEDiceLoss(5)(logits, target)
    with_lovasz = CEDiceLoss(5, lovasz_weight=0.5)(logits, target)
    expected = plain + 0.5 * lovasz_by_sets(logits.softmax(1), target, 5)
    torch.testing.assert_close(with_lovasz, expected, rtol=1e-6, atol=1e-6)
    changed = logits.clone()
    changed[(target == IGNORE).unsqueeze(1).expand_as(logits)] = 100.0
    torch.testing.assert_close(CEDiceLoss(5, lovasz_weight=1.0)(changed, target),
                               CEDiceLoss(5, lovasz_weight=1.0)(logits, target))
    logits.requires_grad_()
    loss = CEDiceLoss(5, ce_weight=0.0, dice_weight=0.0, lovasz_weight=1.0)(logits, torch.full_like(target, IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_logit_shift_by_hand():
    shift = logit_shift([1.0, math.e, 0.0, math.e ** 2, 0.25], 0.5)
    torch.testing.assert_close(shift, torch.tensor([0.0, 0.5, 0.0, 1.0, 0.5 * math.log(0.25)]))  # weight 0: no shift


@pytest.mark.parametrize("ohem_threshold, lovasz_weight", [(0.0, 0.0), (0.7, 1.0)])
def test_logit_adjustment_is_the_loss_of_the_shifted_logits(ohem_threshold, lovasz_weight):
    logits, target = random_batch()
    weights = [0.5, 2.0, 1.0, 0.0, 8.0]
    options = dict(class_weights=weights, ohem_threshold=ohem_threshold, lovasz_weight=lovasz_weight)
    shifted = logits + 0.5 * torch.tensor([math.log(0.5), math.log(2.0), 0.0, 0.0, math.log(8.0)]).view(1, -1, 1, 1)
    adjusted = CEDiceLoss(5, logit_adjustment=0.5, **options)(logits, target)
    torch.testing.assert_close(adjusted, CEDiceLoss(5, **options)(shifted, target))
    assert abs(adjusted - CEDiceLoss(5, **options)(logits, target)) > 1e-3  # the shift does change the loss


def test_logit_adjustment_without_class_weights_changes_nothing():
    logits, target = random_batch()
    torch.testing.assert_close(CEDiceLoss(5, logit_adjustment=1.0)(logits, target), CEDiceLoss(5)(logits, target),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=3, smooth=0.0), "smooth"),
    (dict(num_classes=3, class_weights=[1.0, 2.0]), "shape"),
    (dict(num_classes=2, class_weights=[1.0, -1.0]), ">= 0"),
    (dict(num_classes=2, ohem_threshold=1.5), "ohem_threshold"),
    (dict(num_classes=2, lovasz_weight=-1.0), "lovasz_weight"),
    (dict(num_classes=2, logit_adjustment=-0.5), "logit_adjustment"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CEDiceLoss(**kwargs)


def test_bad_shapes_raise_clear_error():
    criterion = CEDiceLoss(5)
    logits, target = random_batch()
    with pytest.raises(ValueError, match="logits"):
        criterion(logits[:, :3], target)
    with pytest.raises(ValueError, match="target"):
        criterion(logits, target[:, :3])
    with pytest.raises(ValueError, match="target"):
        criterion(logits, target.float())


def test_median_frequency_weights_by_hand():
    # class 0: 60 pixels in images totalling 100 -> f 0.6; class 1: 10 of 50 -> 0.2; class 2: 5 of 100 -> 0.05;
    # class 3 never appears. median(0.6, 0.2, 0.05) = 0.2
    weights = median_frequency_weights([60, 10, 5, 0], [100, 50, 100, 0])
    assert weights.tolist() == pytest.approx([0.2 / 0.6, 1.0, 0.2 / 0.05, 0.0])
    even = median_frequency_weights([10, 20], [100, 100])  # the median of two is their mean: 0.15
    assert even.tolist() == pytest.approx([1.5, 0.75])
    with pytest.raises(ValueError, match="no class appears"):
        median_frequency_weights([0, 0], [0, 0])
