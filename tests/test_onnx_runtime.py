"""inference.py --checkpoint MODEL.onnx (ONNX Runtime, same outputs as PyTorch) and --export --int8 (static int8
quantization calibrated on train photos): masks, scores, metadata, and one-line errors."""
import builtins
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import inference
from conftest import FOLDER_CLASSES, torch_threads, write_folder_dataset
from dataset import SegmentationDataset
from unet import UNet, save_weights

SIZE = (48, 32)  # (width, height) the tiny model is trained at
NAMES = [name for name, _ in FOLDER_CLASSES]


def train_tiny_model(root, input_norm="dataset"):
    """A tiny U-Net trained for a few seconds on the folder dataset's train photos: confident, not random, logits."""
    torch.manual_seed(0)
    model = UNet(3, len(NAMES), base_channels=8, depth=2, dropout=0.0, input_norm=input_norm)
    data = SegmentationDataset(root, "train", SIZE, layout="folder")
    images, masks = map(torch.stack, zip(*(data[index] for index in range(len(data)))))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch_threads(1):  # tiny tensors: one thread is several times faster on a shared machine
        for _ in range(60):
            optimizer.zero_grad()
            F.cross_entropy(model(images), masks, ignore_index=255).backward()
            optimizer.step()
    return model.eval()


def run(*argv):
    return inference.main([*map(str, argv), "--num_workers", "0"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(data root, weights file, its float32 ONNX export, its int8 export)."""
    folder = tmp_path_factory.mktemp("onnx")
    root = write_folder_dataset(folder / "own", SIZE, {"train": 8, "val": 4})
    weights = folder / "model.pth"
    save_weights(weights, train_tiny_model(root), class_names=NAMES, class_colors=[c for _, c in FOLDER_CLASSES],
                 image_size=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dataset="folder")
    assert run("--checkpoint", weights, "--export", folder / "model.onnx", "--device", "cpu") == 0
    assert run("--checkpoint", folder / "model.onnx", "--export", folder / "int8.onnx", "--int8", "--data_root",
               root) == 0
    return root, weights, folder / "model.onnx", folder / "int8.onnx"


def segment(checkpoint, photos, output, *extra):
    """inference.py on a folder; {photo stem: mask} of the written NAME_mask.png files."""
    assert run("--checkpoint", checkpoint, "--input", photos, "--output", output, *extra) == 0
    return {path.stem: np.asarray(Image.open(output / f"{path.stem}_mask.png")) for path in sorted(photos.iterdir())}


def test_an_onnx_checkpoint_writes_the_masks_of_its_pytorch_checkpoint(models, tmp_path):
    root, weights, float_onnx, _ = models
    photos = root / "images" / "val"
    for tta in ("none", "flip"):
        expected = segment(weights, photos, tmp_path / f"torch_{tta}", "--tta", tta, "--device", "cpu")
        got = segment(float_onnx, photos, tmp_path / f"onnx_{tta}", "--tta", tta)
        for name, mask in expected.items():
            assert got[name].shape == mask.shape and (got[name] == mask).mean() >= 0.999
            assert len(np.unique(mask)) >= 2
        written = sorted(path.name for path in (tmp_path / f"onnx_{tta}").iterdir())
        assert written == sorted(f"{path.stem}_{kind}" for path in photos.iterdir()
                                 for kind in ("mask.png", "color.png", "overlay.jpg"))
    segmenter = inference.Segmenter(float_onnx)
    assert isinstance(segmenter, inference.OnnxSegmenter) and segmenter.class_names == NAMES
    assert segmenter.image_size == SIZE and segmenter.class_table.colors.tolist() == [list(c) for _, c in FOLDER_CLASSES]
    inputs = torch.randn(3, 3, SIZE[1], SIZE[0])
    torch.testing.assert_close(segmenter.logits(inputs), inference.Segmenter(weights, device="cpu").logits(inputs),
                               rtol=1e-4, atol=1e-4)


def test_a_photo_normalising_model_exports_its_normalisation_in_float32_and_int8(models, tmp_path):
    root = models[0]
    model = train_tiny_model(root, input_norm="photo")
    save_weights(tmp_path / "photo.pth", model, class_names=NAMES, class_colors=[c for _, c in FOLDER_CLASSES],
                 image_size=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dataset="folder")
    assert run("--checkpoint", tmp_path / "photo.pth", "--export", tmp_path / "photo.onnx", "--device", "cpu") == 0
    deployed = inference.Segmenter(tmp_path / "photo.onnx")
    inputs = torch.stack([SegmentationDataset(root, "val", SIZE, layout="folder")[index][0] for index in range(4)])
    with torch.no_grad():
        expected = model(inputs)
    torch.testing.assert_close(deployed.logits(inputs), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deployed.logits(2 * inputs - 1), expected, rtol=1e-4, atol=1e-4)  # blind to exposure
    assert run("--checkpoint", tmp_path / "photo.onnx", "--export", tmp_path / "int8.onnx", "--int8", "--data_root",
               root) == 0
    quantized = inference.Segmenter(tmp_path / "int8.onnx").logits(inputs).argmax(1)
    assert (quantized == expected.argmax(1)).float().mean() > 0.95


def test_evaluate_scores_an_onnx_model_as_its_pytorch_checkpoint(models, tmp_path):
    root, weights, float_onnx, int8 = models
    reports = {}
    for name, checkpoint in (("torch", weights), ("onnx", float_onnx), ("int8", int8)):
        assert run("--checkpoint", checkpoint, "--evaluate", "--data_root", root, "--output", tmp_path / name) == 0
        reports[name] = json.loads((tmp_path / name / "evaluation_val.json").read_text())
    assert reports["torch"]["miou"] > 0.5  # a trained model, so the agreement below means something
    assert abs(reports["onnx"]["miou"] - reports["torch"]["miou"]) < 1e-3
    assert abs(reports["int8"]["miou"] - reports["torch"]["miou"]) < 0.02
    assert reports["onnx"]["checkpoint"] == str(float_onnx)


def test_int8_export_is_quantized_keeps_the_metadata_and_agrees_with_float32(models, tmp_path):
    root, _, float_onnx, int8 = models
    float_model, quantized = onnx.load(float_onnx), onnx.load(int8)
    assert {p.key: p.value for p in quantized.metadata_props} == {p.key: p.value for p in float_model.metadata_props}
    assert [value.name for value in quantized.graph.input] == ["image"]
    assert [value.name for value in quantized.graph.output] == ["logits"]
    ops = [node.op_type for node in quantized.graph.node]
    convs = ops.count("Conv") + ops.count("ConvTranspose")  # the decoder's transposed convs too
    assert ops.count("Conv") == [node.op_type for node in float_model.graph.node].count("Conv")
    quantized_convs = convs - 1  # the first conv stays float32: its input is the photo itself
    assert ops.count("QuantizeLinear") >= quantized_convs and ops.count("DequantizeLinear") >= 2 * quantized_convs
    weights = {init.name: init for init in quantized.graph.initializer}
    int8_weights = [w for w in weights.values() if w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4]
    assert len(int8_weights) == quantized_convs
    first_conv = next(node for node in quantized.graph.node if node.op_type == "Conv")
    assert weights[first_conv.input[1]].data_type == onnx.TensorProto.FLOAT
    per_channel = [w for w in weights.values() if w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 1
                   and "scale" in w.name]
    assert per_channel  # per-channel weight scales: one per output channel
    photos = root / "images" / "val"
    expected = segment(float_onnx, photos, tmp_path / "float")
    got = segment(int8, photos, tmp_path / "int8")
    same = sum(int((got[name] == mask).sum()) for name, mask in expected.items())
    assert same / sum(mask.size for mask in expected.values()) >= 0.98


def test_the_readme_deployment_snippet_runs_unchanged_on_the_int8_model(models):
    from test_export_and_api import readme_snippet

    root, weights, _, int8 = models
    segmenter = inference.Segmenter(weights, device="cpu")
    for path in sorted((root / "images" / "val").iterdir()):
        namespace = {}
        exec(readme_snippet().replace('"unet_model.onnx"', repr(str(int8))).replace('"street.jpg"', repr(str(path))),
             namespace)
        assert (namespace["mask"] == segmenter(path)).mean() >= 0.98


def foreign_onnx(path, input_name="image", output_name="logits"):
    """A valid ONNX model that inference.py did not write: an identity, without the project's metadata."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", [input_name], [output_name])], "foreign",
        [onnx.helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def error_line(capsys, *argv):
    assert run(*argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    return error


def test_onnx_problems_are_one_line(models, tmp_path, capsys, monkeypatch, make_folder_dataset):
    root, weights, float_onnx, _ = models
    photos = root / "images" / "val"
    out = tmp_path / "out"
    no_meta = foreign_onnx(tmp_path / "identity.onnx")
    assert error_line(capsys, "--checkpoint", no_meta, "--input", photos, "--output", out) == (
        f"error: {no_meta}: an ONNX model without this project's metadata (class_names, class_colors, image_size, "
        f"mean, std missing): export it with python inference.py --export")
    other_names = foreign_onnx(tmp_path / "other.onnx", "input", "output")
    assert error_line(capsys, "--checkpoint", other_names, "--input", photos, "--output", out).startswith(
        f"error: {other_names}: not an ONNX model of this project (inputs ['input'], outputs ['output']")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(float_onnx.read_bytes()[:300])
    assert error_line(capsys, "--checkpoint", corrupt, "--input", photos, "--output", out).startswith(
        f"error: {corrupt}: not a readable ONNX model (")
    assert error_line(capsys, "--checkpoint", tmp_path / "missing.onnx", "--input", photos, "--output", out) == (
        f"error: {tmp_path / 'missing.onnx'}: no such ONNX file")
    assert error_line(capsys, "--checkpoint", float_onnx, "--device", "cuda", "--input", photos, "--output", out) == (
        "error: --device cuda: ONNX models run on the CPU (ONNX Runtime's CPU package)")
    assert not out.exists()

    no_photos = make_folder_dataset("empty", counts={"train": 0, "val": 1})
    assert error_line(capsys, "--checkpoint", weights, "--export", tmp_path / "q.onnx", "--int8", "--data_root",
                      no_photos, "--device", "cpu").startswith(
        f"error: --data_root {no_photos}: no train photos to calibrate the int8 model with")
    assert error_line(capsys, "--checkpoint", weights, "--export", tmp_path / "q.onnx", "--int8", "--data_root",
                      tmp_path / "nowhere", "--device", "cpu").startswith(
        f"error: --data_root {tmp_path / 'nowhere'}: no train photos to calibrate the int8 model with (")
    assert not (tmp_path / "q.onnx").exists()

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert error_line(capsys, "--checkpoint", float_onnx, "--input", photos, "--output", out) == (
        f"error: --checkpoint {float_onnx} needs ONNX Runtime: pip install -r requirements-onnxruntime.txt")
    assert error_line(capsys, "--checkpoint", weights, "--export", tmp_path / "q.onnx", "--int8", "--data_root", root,
                      "--device", "cpu") == "error: --int8 needs ONNX Runtime: pip install -r requirements-onnxruntime.txt"


def test_training_never_imports_onnx_runtime():
    source = (Path(inference.__file__).parent / "training.py").read_text()
    assert "onnx" not in source


def test_an_onnx_model_segments_a_video_as_its_weights_file_does(models, tmp_path):
    """Videos go through the same Predictor interface: the ONNX export's frame masks are its weights file's."""
    pytest.importorskip("av")
    from test_video import write_video

    _, weights, float_onnx, _ = models
    rng = np.random.default_rng(0)
    write_video(tmp_path / "clip.mp4", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)])
    masks = {}
    for name, checkpoint in (("pth", weights), ("onnx", float_onnx)):
        assert run("--checkpoint", checkpoint, "--input", tmp_path / "clip.mp4", "--output", tmp_path / name,
                   "--frames", "--device", "cpu") == 0
        masks[name] = [np.array(Image.open(path)) for path in sorted((tmp_path / name / "clip").glob("*_mask.png"))]
    assert len(masks["onnx"]) == 6 and masks["onnx"][0].shape == (48, 64)
    same = sum(int((a == b).sum()) for a, b in zip(masks["pth"], masks["onnx"]))
    assert same / sum(mask.size for mask in masks["pth"]) >= 0.999
