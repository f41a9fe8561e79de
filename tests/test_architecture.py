"""The import graph the README draws: one way, from runtime.py at the bottom to training.py and inference.py on
top, neither of which imports the other; segmenting a photo loads no training code."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Layers, bottom first: a module may import only modules of lower layers.
LAYERS = [
    {"runtime"},
    {"unet"},
    {"dataset", "losses", "lr_schedule", "metrics", "synthetic_city"},
    {"batches", "checkpoint", "visualize", "onnx_runtime"},
    {"config", "video"},
    {"training", "inference"},
]
LAYER = {module: index for index, modules in enumerate(LAYERS) for module in modules}


def project_imports(path):
    """Project modules a file imports, anywhere in it (function-level imports included)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported & set(LAYER)


def test_every_top_level_module_has_a_layer():
    assert {path.stem for path in REPO.glob("*.py")} == set(LAYER)


def test_imports_only_go_down_the_layers():
    for module, layer in LAYER.items():
        for imported in project_imports(REPO / f"{module}.py"):
            assert LAYER[imported] < layer, f"{module}.py imports {imported}.py"


def test_benches_and_tests_do_not_patch_the_import_path():
    for path in [*REPO.glob("bench/*.py"), *REPO.glob("tests/*.py")]:
        assert "sys.path." not in path.read_text().replace('"sys.path."', ""), path


def test_importing_inference_loads_no_training_code():
    code = ("import sys, inference; print(' '.join(sorted(m for m in ('training', 'synthetic_city', 'config', "
            "'batches', 'losses', 'lr_schedule') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
