"""Tests for unet.py: shapes at any size, parameter counts, padding, dtypes, memory formats, compile."""
import re

import pytest
import torch
import torch.nn.functional as F

from unet import UNet, load_weights, save_weights, standardise_photos


def tiny_unet(**kwargs):
    """A 4-channel-wide U-Net that runs in milliseconds on CPU, in eval mode unless told otherwise."""
    torch.manual_seed(0)
    return UNet(**{"base_channels": 4, "depth": 3, "num_classes": 5, **kwargs}).eval()


def hand_parameter_count(in_channels, num_classes, base_channels, depth, bilinear):
    """Parameter count from the architecture's layer shapes, written out independently of unet.py."""
    def double_conv(cin, cout, mid):  # two bias-free 3x3 convs + two BatchNorms (weight and bias)
        return 9 * cin * mid + 2 * mid + 9 * mid * cout + 2 * cout

    widths = [base_channels * 2**i for i in range(depth + 1)]
    halve = 2 if bilinear else 1
    total = double_conv(in_channels, widths[0], widths[0])
    for i in range(1, depth + 1):
        out = widths[i] // halve if i == depth else widths[i]
        total += double_conv(widths[i - 1], out, out)
    for i in range(depth, 0, -1):
        out = widths[i - 1] // halve if i > 1 else widths[0]
        if bilinear:
            total += double_conv(widths[i], out, widths[i] // 2)
        else:  # 2x2 transposed conv with bias, halving the channels
            total += 4 * widths[i] * (widths[i] // 2) + widths[i] // 2 + double_conv(widths[i], out, out)
    return total + widths[0] * num_classes + num_classes  # 1x1 head with bias


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("height, width", [(1, 1), (15, 15), (37, 53), (256, 512)])
def test_output_shape_for_any_size(height, width, bilinear):
    model = tiny_unet(depth=4, bilinear=bilinear)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 5, height, width)
    assert torch.isfinite(logits).all()


def test_classic_parameter_count():
    with torch.device("meta"):  # no memory or init time for 31 M parameters
        classic = UNet()
        milesial = UNet(num_classes=2)
        milesial_bilinear = UNet(num_classes=2, bilinear=True)
    assert count_parameters(classic) == hand_parameter_count(3, 19, 64, 4, bilinear=False) == 31_038_803
    # milesial/Pytorch-UNet's published sizes for its 2-class models: 31,037,698 and 17,263,042.
    assert count_parameters(milesial) == 31_037_698
    assert count_parameters(milesial_bilinear) == hand_parameter_count(3, 2, 64, 4, bilinear=True) == 17_263_042


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("bilinear", [False, True])
def test_small_parameter_counts_match_hand_formula(depth, bilinear):
    model = UNet(in_channels=1, num_classes=3, base_channels=6, depth=depth, bilinear=bilinear)
    assert count_parameters(model) == hand_parameter_count(1, 3, 6, depth, bilinear)


@pytest.mark.parametrize("bilinear", [False, True])
def test_gradients_reach_every_parameter(bilinear):
    model = tiny_unet(bilinear=bilinear).train()
    logits = model(torch.randn(2, 3, 20, 28))
    F.cross_entropy(logits, torch.randint(0, 5, (2, 20, 28))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_train_applies_dropout():
    x = torch.randn(2, 3, 32, 32)
    model = tiny_unet(dropout=0.5)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()  # BatchNorm uses batch statistics: deterministic, so any difference is dropout
        assert not torch.equal(model(x), model(x))
        model_without_dropout = tiny_unet(dropout=0.0).train()
        assert torch.equal(model_without_dropout(x), model_without_dropout(x))


def test_padding_is_zero_at_bottom_right_and_cropped():
    model = tiny_unet()  # depth 3: multiples of 8
    with torch.no_grad():
        divisible = torch.randn(2, 3, 32, 16)
        assert torch.equal(model(divisible), model.forward_unpadded(divisible))
        odd = torch.randn(2, 3, 15, 9)
        padded_by_hand = torch.cat([odd, torch.zeros(2, 3, 1, 9)], dim=2)
        padded_by_hand = torch.cat([padded_by_hand, torch.zeros(2, 3, 16, 7)], dim=3)
        assert torch.equal(model(odd), model.forward_unpadded(padded_by_hand)[:, :, :15, :9])


def test_bf16_autocast_on_cpu():
    model = tiny_unet()
    x = torch.randn(2, 3, 37, 21)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 5, 37, 21) and logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        assert torch.allclose(logits.float(), model(x), atol=0.1, rtol=0.05)


def test_channels_last_matches_contiguous():
    model = tiny_unet()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 32, 32), (3, 32, 32), (1, 1, 3, 32, 32), (2, 3, 0, 8)])
def test_wrong_input_shape_raises(shape):
    with pytest.raises(ValueError, match=re.escape(f"UNet expects input of shape (N, 3, H, W), got {shape}")):
        tiny_unet()(torch.zeros(shape))


def test_integer_input_raises():
    with pytest.raises(ValueError, match="floating-point"):
        tiny_unet()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_photo_input_norm_makes_the_model_blind_to_exposure_and_contrast():
    torch.manual_seed(0)
    photos = torch.randn(2, 3, 20, 24)
    brighter = photos * torch.tensor([2.0, 0.5]).view(2, 1, 1, 1) + torch.tensor([1.5, -0.7]).view(2, 1, 1, 1)
    for input_norm, blind in (("photo", True), ("dataset", False)):
        torch.manual_seed(1)
        model = UNet(3, 5, base_channels=4, depth=2, input_norm=input_norm).eval()
        with torch.no_grad():
            same = torch.allclose(model(photos), model(brighter), atol=1e-4)
        assert same == blind, input_norm


def test_photo_input_norm_is_finite_on_a_blank_photo_in_bf16():
    model = UNet(3, 5, base_channels=4, depth=2, input_norm="photo").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.full((1, 3, 16, 16), 0.3)).isfinite().all()
    photo = torch.full((1, 3, 16, 16), 0.3)
    photo[..., 0, 0] += 1e-3  # noise far below one grey level stays that small
    assert standardise_photos(photo).abs().max() < 0.05


def test_input_norm_goes_into_the_weights_file_and_must_be_known(tmp_path):
    save_weights(tmp_path / "m.pth", UNet(3, 5, base_channels=4, depth=2, input_norm="photo"), class_names=list("abcde"),
                 class_colors=[(0, 0, 0)] * 5, image_size=(24, 20), mean=(0.5,) * 3, std=(0.2,) * 3, dataset=None)
    assert load_weights(tmp_path / "m.pth").model.config["input_norm"] == "photo"
    with pytest.raises(ValueError, match="input_norm 'image'"):
        UNet(input_norm="image")


def test_config_rebuilds_the_same_model():
    model = tiny_unet(bilinear=True, dropout=0.2)
    assert model.config == dict(in_channels=3, num_classes=5, base_channels=4, depth=3, dropout=0.2, bilinear=True,
                                input_norm="dataset")
    model.config["depth"] = 99  # a copy: callers cannot corrupt the model's record
    rebuilt = UNet(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_compile_matches_eager():
    """~25 s on a 2-core CPU with a cold inductor cache, a few seconds warm."""
    model = tiny_unet(depth=2)
    x = torch.randn(2, 3, 19, 13)  # odd size: pad and crop go through the compiled graph
    with torch.no_grad():
        compiled = torch.compile(model, dynamic=False)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
