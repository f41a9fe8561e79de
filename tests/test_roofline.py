"""bench/roofline.py's cost model, against hand counts and torch's FlopCounterMode: its conclusions
(bench/README.md) are only as good as these numbers."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from bench import roofline
from unet import UNet


def test_a_conv_costs_its_hand_counted_flops_and_bytes():
    with FakeTensorMode():
        conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        images = torch.empty(2, 8, 32, 64)
        with roofline.OpCosts() as costs:
            conv(images).view(2, -1).t()  # view and transpose: no kernels
    [(name, flops, nbytes, dtype)] = costs.ops
    assert name == "convolution" and dtype == torch.float32
    assert flops == 2 * (2 * 32 * 64) * 16 * (8 * 3 * 3)  # multiply-adds per output value, times outputs
    assert nbytes == 4 * (2 * 8 * 32 * 64 + 16 * 8 * 3 * 3 + 16 + 2 * 16 * 32 * 64)  # input, weight, bias, output


def test_in_place_ops_count_one_read_and_one_write():
    with FakeTensorMode():
        values = torch.empty(1000)
        with roofline.OpCosts() as costs:
            values.relu_()
    assert costs.ops == [("relu_", 0, 2 * 4 * 1000, torch.float32)]


def test_step_flops_match_torch_flop_counter():
    ops, num_parameters = roofline.step_costs(2, 64, 32, base_channels=8, depth=2)
    model = UNet(3, roofline.NUM_CLASSES, 8, 2)
    assert num_parameters == sum(parameter.numel() for parameter in model.parameters())
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model = UNet(3, roofline.NUM_CLASSES, 8, 2)
        model(torch.empty(2, 3, 32, 64)).sum().backward()
    assert sum(flops for _, flops, _, _ in ops) == counter.get_total_flops()
    convs = [dtype for name, _, _, dtype in ops if name in roofline.CONV_OPS]
    assert convs and set(convs) == {torch.bfloat16}  # autocast runs the convs in bf16, as on a GPU


def test_fused_estimate_sits_between_the_convs_and_eager(capsys):
    roofline.run(roofline.parse_args(["--batch_size", "2"]))  # fake tensors: the classic size costs nothing
    lines = [line for line in capsys.readouterr().out.splitlines() if "ms per step" in line]
    eager, fused, convs = (float(line.split(">= ")[1].split(" ms")[0]) for line in lines)
    assert convs < fused < eager


def test_overrides_must_be_positive():
    with pytest.raises(SystemExit):
        roofline.parse_args(["--bandwidth_tbps", "0"])
