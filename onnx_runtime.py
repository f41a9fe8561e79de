"""ONNX models of this project: the export (torch.onnx, with the metadata), a Predictor that runs one through ONNX
Runtime, and the int8 (static, QDQ) quantizer.

    python inference.py --checkpoint unet_model.onnx ...               # any inference.py run, through ONNX Runtime
    python inference.py --export unet_int8.onnx --int8 --data_root PATH  # calibrated on up to 100 train photos

ONNX Runtime is optional (pip install -r requirements-onnxruntime.txt): this module imports it only when a model
is opened or quantized, and training never imports this module.
"""
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from dataset import DatasetError, open_layout, read_image, to_model_input
from runtime import UserError, atomic_write, import_optional
from unet import TTA_SCALES, Predictor

ONNXRUNTIME_REQUIREMENTS = "requirements-onnxruntime.txt"
METADATA_KEYS = ("class_names", "class_colors", "image_size", "mean", "std")
CALIBRATION_PHOTOS = 100


def import_onnxruntime(purpose):
    """The onnxruntime package, or one line saying which requirements file installs it."""
    return import_optional("onnxruntime", needed_for=f"{purpose} needs ONNX Runtime",
                           requirements=ONNXRUNTIME_REQUIREMENTS)


def open_session(path, threads=None):
    """An InferenceSession of `path` (CPU), with a one-line error for a missing, corrupt or foreign file. Its threads
    sleep between runs instead of spinning: inference.py decodes and writes photos on the same cores meanwhile."""
    onnxruntime = import_onnxruntime(f"--checkpoint {path}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime reports a bad file as InvalidProtobuf, Fail, InvalidGraph, ...
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"{path}: not a readable ONNX model ({reason})") from None
    names = ([value.name for value in session.get_inputs()], [value.name for value in session.get_outputs()])
    if names != (["image"], ["logits"]):
        raise UserError(f"{path}: not an ONNX model of this project (inputs {names[0]}, outputs {names[1]}; expected "
                        f"image -> logits, as python inference.py --export writes it)")
    return session


def read_metadata(session, path):
    """{class_names, class_colors, image_size, mean, std, dataset} as export_onnx below records them."""
    stored = session.get_modelmeta().custom_metadata_map
    missing = [key for key in METADATA_KEYS if key not in stored]
    if missing:
        raise UserError(f"{path}: an ONNX model without this project's metadata ({', '.join(missing)} missing): "
                        f"export it with python inference.py --export")
    try:
        return {key: json.loads(stored[key]) for key in (*METADATA_KEYS, "dataset") if key in stored}
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: unreadable metadata ({error})") from None


class OnnxPredictor(Predictor):
    """A Predictor (same logits, scores and test-time augmentation) whose model is an ONNX file run by ONNX
    Runtime on the CPU. --amp and --channels_last are PyTorch's: ONNX Runtime chooses its own kernels."""

    def __init__(self, path, device="auto", amp="auto", tta="none", threads=None):
        if tta not in TTA_SCALES:
            raise UserError(f"--tta {tta}: expected one of {', '.join(TTA_SCALES)}")
        if str(device) not in ("auto", "cpu"):
            raise UserError(f"--device {device}: ONNX models run on the CPU (ONNX Runtime's CPU package)")
        if amp not in ("auto", "off"):
            raise UserError(f"--amp {amp}: an ONNX model runs in the precision it was exported in")
        self.path, self.session = Path(path), open_session(path, threads)
        self.metadata = read_metadata(self.session, path)
        self.device, self.tta, self.amp_dtype, self.channels_last = torch.device("cpu"), tta, None, False
        self.model = None  # no PyTorch model: logits() runs the session

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) model inputs -> (N, C, h, w) float32 logits."""
        array = np.ascontiguousarray(inputs.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"image": array})[0])


# ----------------------------------------------------------------------------- int8

def calibration_photos(data_root, image_size, mean, std, count=CALIBRATION_PHOTOS):
    """Up to `count` train photos of data_root, evenly spaced over the split (not one drive's first frames), as
    (1, 3, h, w) float32 model inputs; any layout dataset.py reads."""
    try:
        paths = [image for image, _ in open_layout(data_root).samples("train")]
    except DatasetError as error:
        raise UserError(f"--data_root {data_root}: no train photos to calibrate the int8 model with ({error})") \
            from None
    if not paths:
        raise UserError(f"--data_root {data_root}: no train photos to calibrate the int8 model with")
    chosen = paths[:: max(1, len(paths) // count)][:count]
    return [to_model_input(read_image(path), image_size, mean, std)[None].numpy() for path in chosen]


def quantize_int8(float_model, calibration_inputs):
    """`float_model` (an onnx.ModelProto) statically quantized to int8 by ONNX Runtime's tools: QDQ format,
    per-channel int8 weights, uint8 activations whose ranges (min/max) come from calibration_inputs; the metadata
    is kept. The first convolution stays float32: its input is the photo itself, and an unseen scene's pixels (a
    brighter sky than any calibration photo's) would be clipped by an int8 input (docs/inference.md)."""
    import onnx
    import_onnxruntime("--int8")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.inputs = iter(calibration_inputs)

        def get_next(self):
            return next(({"image": image} for image in self.inputs), None)

    first_conv = next(node.name for node in float_model.graph.node if node.op_type == "Conv")
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(float_model, f"{folder}/float.onnx")
        quant_pre_process(f"{folder}/float.onnx", f"{folder}/prepared.onnx", skip_symbolic_shape=True)
        quantize_static(f"{folder}/prepared.onnx", f"{folder}/int8.onnx", Photos(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[first_conv])
        quantized = onnx.load(f"{folder}/int8.onnx")
    onnx.helper.set_model_props(quantized, {prop.key: prop.value for prop in float_model.metadata_props})
    return quantized


# ----------------------------------------------------------------------------- ONNX export

EXPORT_REQUIREMENTS = "requirements-export.txt"


def export_onnx(segmenter, path, int8_data_root=None):
    """Write the model as inference runs it (BatchNorm folded, float32) to an ONNX file: input `image`, a
    normalised float32 (N, 3, H, W) batch of any N, H and W; output `logits`, (N, C, H, W); the class names and
    colours, training size and normalisation in the model's metadata. With int8_data_root: statically quantized
    to int8, calibrated on up to 100 of its train photos (onnx_runtime.quantize_int8)."""
    onnx = import_optional("onnx", "onnxscript", needed_for="--export needs the onnx and onnxscript packages",
                           requirements=EXPORT_REQUIREMENTS)  # torch.onnx's exporter needs onnxscript
    if int8_data_root:
        import_onnxruntime("--int8")
    if isinstance(segmenter, OnnxPredictor) and not int8_data_root:
        raise UserError(f"--export: {segmenter.path} is already an ONNX model (add --int8 to quantize it)")
    if int8_data_root:  # read the photos first: a folder without any is an error before the slow export
        calibration = calibration_photos(int8_data_root, segmenter.image_size, segmenter.mean, segmenter.std)
    exported = onnx.load(segmenter.path) if isinstance(segmenter, OnnxPredictor) else float_onnx(segmenter, onnx)
    precision = "float32"
    if int8_data_root:
        exported = quantize_int8(exported, calibration)
        precision = f"int8 (calibrated on {len(calibration)} train photos)"
    atomic_write(path, lambda file: file.write(exported.SerializeToString()))
    width, height = segmenter.image_size
    classes = segmenter.class_table.num_classes
    print(f"{path}: {precision} ONNX model of {classes} classes, trained at {width}x{height}; input image "
          f"(batch, 3, height, width) normalised, output logits (batch, {classes}, height, width)")
    return 0


def float_onnx(segmenter, onnx):
    """The segmenter's PyTorch model exported by torch.onnx, with named dynamic axes and the metadata."""
    model = copy.deepcopy(segmenter.model).float().to("cpu", memory_format=torch.contiguous_format)
    width, height = segmenter.image_size
    example = torch.zeros(2, 3, height, width)
    dynamic = torch.export.Dim.DYNAMIC
    with tempfile.TemporaryDirectory() as folder:
        torch.onnx.export(model, (example,), f"{folder}/model.onnx", dynamo=True, input_names=["image"],
                          output_names=["logits"], dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}})
        exported = onnx.load(f"{folder}/model.onnx")
    for value in (*exported.graph.input, *exported.graph.output):
        for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
            value.type.tensor_type.shape.dim[axis].dim_param = name
    table = segmenter.class_table
    onnx.helper.set_model_props(exported, {
        "class_names": json.dumps(table.names), "class_colors": json.dumps(table.colors.tolist()),
        "image_size": json.dumps(list(segmenter.image_size)), "mean": json.dumps(list(segmenter.mean)),
        "std": json.dumps(list(segmenter.std)), "dataset": json.dumps(segmenter.dataset),
        "preprocessing": "RGB resized to image_size (width, height), scaled to [0, 1], minus mean, divided by std, "
                         "NCHW float32; masks: argmax over the logits upsampled to the photo's size"})
    return exported
