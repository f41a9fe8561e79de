"""The Python API (inference.Segmenter) and the ONNX export: both give the masks inference.py writes."""
import builtins
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

import inference
from conftest import noise
from dataset import MEAN, STD
from runtime import UserError
from unet import UNet, save_weights

REPO = Path(__file__).resolve().parents[1]
NAMES = ["road", "traffic cone", "sky", "car", "tree"]
COLORS = [(128, 64, 128), (255, 128, 0), (70, 130, 180), (0, 0, 142), (107, 142, 35)]
SIZE = (32, 16)


def trained_looking_unet(bilinear=False):
    """A tiny U-Net whose BatchNorm statistics and affine parameters are far from their initial values."""
    torch.manual_seed(3)
    model = UNet(3, len(NAMES), base_channels=4, depth=2, bilinear=bilinear).train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
        for step in range(3):
            model(torch.randn(4, 3, 16, 32) * 3 + step)
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["transposed", "bilinear"])
def exported(tmp_path_factory, request):
    """Both decoders: the seed's transposed convs and the camvid preset's bilinear upsampling."""
    folder = tmp_path_factory.mktemp("export")
    weights = folder / "unet_model.pth"
    save_weights(weights, trained_looking_unet(request.param), class_names=NAMES, class_colors=COLORS,
                 image_size=SIZE, mean=MEAN, std=STD, dataset="folder")
    assert inference.main(["--checkpoint", str(weights), "--export", str(folder / "unet_model.onnx"),
                           "--device", "cpu"]) == 0
    return weights, folder / "unet_model.onnx"


def photos(folder, rng):
    """Photo-like images of two sizes, as files."""
    folder.mkdir(exist_ok=True)
    paths = []
    for index, (height, width) in enumerate([(48, 96), (48, 96), (120, 90)]):
        paths.append(folder / f"photo{index}.png")
        Image.fromarray(noise(rng, height, width)).save(paths[-1])
    return paths


@pytest.mark.both_cpu_kinds
def test_onnx_logits_match_inference_at_two_sizes_and_two_batch_sizes(exported):
    weights, onnx_path = exported
    segmenter = inference.Segmenter(weights, device="cpu")
    session = onnxruntime.InferenceSession(onnx_path)
    rng = np.random.default_rng(0)
    for height, width in ((16, 32), (40, 56)):  # the training size, and another one: H and W are dynamic
        for batch in (1, 3):
            inputs = torch.stack([torch.from_numpy(np.array(noise(rng, height, width))).permute(2, 0, 1).float() / 255
                                  for _ in range(batch)])
            inputs = (inputs - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
            expected = segmenter.logits(inputs).numpy()
            got = session.run(["logits"], {"image": inputs.numpy()})[0]
            assert got.shape == (batch, len(NAMES), height, width)
            assert np.abs(got - expected).max() < 1e-4  # the stated tolerance: float32 rounding only
            agreement = (got.argmax(1) == expected.argmax(1)).mean()
            assert agreement >= 0.999 and len(np.unique(expected.argmax(1))) >= 2


def test_onnx_metadata_and_named_dynamic_axes(exported):
    model = onnx.load(exported[1])
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["class_colors"]) == [list(c) for c in COLORS]
    assert json.loads(meta["image_size"]) == list(SIZE) and json.loads(meta["mean"]) == list(MEAN)
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch" and dims[2:] == ["height", "width"]
    assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)  # folded, as inference runs


def readme_snippet():
    """The deployer's snippet of the README's export section."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    [snippet] = [block for block in blocks if "onnxruntime.InferenceSession" in block]
    return snippet


@pytest.mark.both_cpu_kinds
def test_the_readme_deployment_snippet_gives_the_masks_of_inference(exported, tmp_path):
    weights, onnx_path = exported
    segmenter = inference.Segmenter(weights, device="cpu")
    for path in photos(tmp_path / "photos", np.random.default_rng(1)):
        code = readme_snippet().replace('"unet_model.onnx"', repr(str(onnx_path))).replace('"street.jpg"',
                                                                                             repr(str(path)))
        namespace = {}
        exec(code, namespace)
        expected = segmenter(path)
        assert namespace["mask"].shape == expected.shape
        assert (namespace["mask"] == expected).mean() >= 0.999
        np.testing.assert_array_equal(namespace["colors"], np.array(COLORS, np.uint8)[namespace["mask"]])


def test_export_problems_are_one_line(exported, tmp_path, capsys, monkeypatch):
    weights, _ = exported
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("the user's notes")
    assert inference.main(["--checkpoint", str(weights), "--export", str(not_a_folder / "m.onnx"), "--device",
                           "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {not_a_folder / 'm.onnx'}: could not write it") and "\n" not in error
    broken = tmp_path / "broken.pth"
    broken.write_text("not a checkpoint")
    assert inference.main(["--checkpoint", str(broken), "--export", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {broken} is not a PyTorch checkpoint")

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxscript"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert inference.main(["--checkpoint", str(weights), "--export", str(tmp_path / "m.onnx"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --export needs the onnx and onnxscript packages: pip install -r "
                                               "requirements-export.txt")
    assert not (tmp_path / "m.onnx").exists() and not_a_folder.read_text() == "the user's notes"


def test_segmenter_gives_the_command_line_masks_for_paths_pil_images_and_arrays(exported, tmp_path):
    weights, _ = exported
    paths = photos(tmp_path / "photos", np.random.default_rng(2))
    assert inference.main(["--checkpoint", str(weights), "--input", str(tmp_path / "photos"), "--output",
                           str(tmp_path / "out"), "--device", "cpu", "--num_workers", "0"]) == 0
    segmenter = inference.Segmenter(weights, device="cpu")
    assert segmenter.class_names == NAMES and segmenter.class_table.colors.tolist() == [list(c) for c in COLORS]
    for path in paths:
        written = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_mask.png"))
        photo = Image.open(path)
        for image in (path, str(path), photo, np.asarray(photo)):
            mask = segmenter(image)
            assert mask.dtype == np.uint8 and mask.shape == (photo.height, photo.width)
            np.testing.assert_array_equal(mask, written)
        mask, probabilities = segmenter(path, probabilities=True)
        assert probabilities.shape == (len(NAMES), photo.height, photo.width) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(0), 1, atol=1e-5)
        assert (probabilities.argmax(0) == mask).mean() >= 0.999  # the same scores, argmaxed
    gray = np.asarray(Image.open(paths[0]).convert("L"))
    np.testing.assert_array_equal(segmenter(gray), segmenter(Image.fromarray(gray)))
    with pytest.raises(UserError, match="expected a uint8 array"):
        segmenter(np.zeros((4, 4, 3), np.float32))


def test_test_time_augmentation_averages_probabilities_over_mirror_images_and_scales(exported, tmp_path):
    weights, _ = exported
    plain = inference.Segmenter(weights, device="cpu")
    inputs = torch.stack([plain.model_input(np.array(noise(np.random.default_rng(4), 30, 50))) for _ in range(2)])

    def probabilities(x):
        return plain.logits(x).softmax(1)

    expected_flip = (probabilities(inputs) + probabilities(inputs.flip(-1)).flip(-1)) / 2
    flip = inference.Segmenter(weights, device="cpu", tta="flip")
    torch.testing.assert_close(flip.scores(inputs), expected_flip, rtol=1e-5, atol=1e-6)
    expected_ms = 0
    for scale in (0.75, 1.0, 1.25):
        scaled = torch.nn.functional.interpolate(inputs, scale_factor=scale, mode="bilinear", antialias=scale < 1)
        both = (probabilities(scaled) + probabilities(scaled.flip(-1)).flip(-1)) / 2
        expected_ms = expected_ms + torch.nn.functional.interpolate(both, size=inputs.shape[-2:], mode="bilinear") / 3
    multi_scale = inference.Segmenter(weights, device="cpu", tta="ms")
    torch.testing.assert_close(multi_scale.scores(inputs), expected_ms, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected_flip, expected_ms, atol=1e-3)  # the two really differ

    paths = photos(tmp_path / "photos", np.random.default_rng(5))
    assert inference.main(["--checkpoint", str(weights), "--input", str(tmp_path / "photos"), "--output",
                           str(tmp_path / "out"), "--tta", "flip", "--device", "cpu", "--num_workers", "0"]) == 0
    for path in paths:
        mask, probs = flip(path, probabilities=True)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_mask.png")), mask)
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    with pytest.raises(UserError, match="--tta twice"):
        inference.Segmenter(weights, tta="twice")
