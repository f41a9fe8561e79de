"""What training.py and inference.py both need from the machine: the device and its precision and memory
layout, files and images written atomically with errors that name them, safe checkpoint loading, one-line CLI
errors, and the process group of a torchrun job.

It sits at the bottom of the import graph (it imports no module of the project), so every other module may use it.
"""
import argparse
import contextlib
import ctypes
import io
import os
import pickle
import re
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

USAGE_ERROR_EXIT_CODE = 2
DEFAULT_IMAGE_SIZE = (512, 256)  # (width, height): the original project's training size, wherever none is given
INTERRUPTED_EXIT_CODE = 130


class UserError(ValueError):
    """Bad input (a flag, a path, a data file): the message names the file or flag and the problem, and
    the command line prints it as one line. The single-argument form lets a DataLoader worker re-raise it."""


class Stopped(Exception):
    """A command that cannot go on for a reason that is not bad input; run_cli prints the message as it is
    and exits with exit_code."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(error: BaseException) -> str:
    """An error as the user should read it: `file: problem`. An OSError names its file first (its own text
    puts it last); a DataLoader worker's re-raise carries the worker's traceback, whose last line is kept."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    message = str(error).strip()
    if "Traceback (most recent call last)" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split())


def run_cli(command, *args):
    """command(*args) for a script's main: bad input (ValueError, OSError) becomes `error: ...` on stderr and
    exit status 2, Stopped its own line and status, Ctrl-C one line and 130. Returns the exit status."""
    try:
        return command(*args) or 0
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    except Stopped as stopped:
        if str(stopped):
            print(stopped, file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def import_optional(*modules, needed_for, requirements):
    """The optional packages a feature needs (the first one is returned), or one line naming the
    requirements file that installs them, e.g. `video input needs PyAV: pip install -r requirements-video.txt`."""
    try:
        return [__import__(module) for module in modules][0]  # builtins' import, as `import` statements use
    except ImportError:
        raise UserError(f"{needed_for}: pip install -r {requirements}") from None


def parse_size(text: str) -> tuple[int, int]:
    """'512x256' -> (512, 256), i.e. (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise ValueError(f"invalid size {text!r}: expected WIDTHxHEIGHT with positive integers, e.g. 512x256")
    return int(match[1]), int(match[2])


def size_arg(text: str) -> tuple[int, int]:
    """parse_size for argparse `type=`: its message reaches the user (argparse hides a ValueError's)."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ----------------------------------------------------------------------------- files

def temp_path(path) -> Path:
    """Where a file is written before it is renamed to `path`: hidden, beside it, named by the writing process so
    that remove_stale_temp_files can tell a killed writer's leftovers from a running one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: a kill at any
    instant leaves the previous file intact, and a symlink at `path` is replaced, never written through.
    A failure (a full disk, a read-only folder) is an OSError that names `path`; no temporary file remains."""
    path, temp = Path(path), temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        raise OSError(error.errno, f"could not write it ({error.strerror or error})", str(path)) from None
    finally:
        with contextlib.suppress(OSError):  # nothing to remove when the folder itself was the problem
            temp.unlink()


def write_image_atomically(path, pixels, image_format="PNG", **save_options):
    """A uint8 array (or a PIL image) as an image file, through atomic_write: never half a file, and a failure
    names the file. save_options go to PIL (e.g. quality=90 for JPEG)."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    atomic_write(path, lambda file: image.save(file, format=image_format, **save_options))


def save_figure(figure, path):
    """A matplotlib figure as a PNG, through atomic_write."""
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def remove_stale_temp_files(folder):
    """Delete the temporary files that atomic_write left in `folder` when its process was killed (SIGKILL,
    a power cut); those of a process still running are kept. Returns how many were removed."""
    removed = 0
    for path in Path(folder).glob(".*.tmp"):
        match = re.fullmatch(r"\..+\.(\d+)\.tmp", path.name)
        if match and not process_is_alive(int(match[1])):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def process_is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_torch_file(obj, path):
    """torch.save, atomically. The object is serialised in memory first, so a full disk surfaces as an
    OSError naming `path` (torch's zip writer would report it as an unreadable internal RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda file: file.write(buffer.getbuffer()))


def load_torch_file(path):
    """torch.load with weights_only=True (nothing in the file can run code); every failure is a UserError
    naming the file. The one place this project calls torch.load."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train a model first with `python training.py` (or pass "
                        f"--checkpoint PATH)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not a checkpoint (notes, an image, a truncated download) fails in whatever part of
    # torch.load meets it first: IndexError, KeyError, EOFError, RuntimeError, UnpicklingError, ...
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # the weights_only unpickler's own reason ("Unsupported operand 0"), not its generic advice; else
        # the error's first sentence, with its type when the message alone says nothing ("105")
        reason = next((line for line in lines if "Unsupported" in line), lines[0].split(". ")[0] if lines else "")
        if len(reason) < 12:
            reason = f"{type(error).__name__}: {reason}".rstrip(": ")
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in reason:
            raise UserError(f"refused to load checkpoint {path}: it holds objects other than tensors and plain "
                            f"containers, and unpickling them could run code ({reason})") from None
        problem = "is empty" if path.stat().st_size == 0 else f"is not a PyTorch checkpoint (torch.load: {reason})"
        raise UserError(f"checkpoint {path} {problem}") from None


# ----------------------------------------------------------------------------- device

def resolve_device(name="auto", local_rank=0) -> torch.device:
    """auto -> this rank's GPU when CUDA is available, else the CPU; selects the GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device available")
        torch.cuda.set_device(device)
    return device


GLIBC_DEFAULT_MMAP_MAX = 65536  # mallopt parameters and glibc's defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory(keep=True) -> bool:
    """glibc: keep freed memory in the process (keep=True) or return it to the kernel (glibc's default). By
    default every allocation above 32 MB gets a fresh mmap, so each CPU training step page-faults its large
    activations in anew and the kernel zeroes them; kept, they are reused. True when glibc took the setting."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to tune
        return False
    mmap_max, trim_threshold = (0, 2**30) if keep else (GLIBC_DEFAULT_MMAP_MAX, 128 * 2**10)
    return bool(libc.mallopt(M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX), as oneDNN uses them;
    elsewhere bf16 is emulated and slower than float32."""
    return bool(torch.backends.mkldnn.is_available()
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp -> autocast dtype (None: float32)


def precision_name(dtype) -> str:
    """An autocast dtype (None: none) as a person reads it: float32, bf16 autocast or fp16 autocast."""
    if dtype is None:
        return "float32"
    return {known: name for name, known in AMP_DTYPES.items()}[dtype] + " autocast"


def autocast_dtype(amp: str, device: torch.device, training=True):
    """--amp -> the autocast dtype, or None for float32. auto: on GPUs bf16, or fp16 (with a GradScaler) where bf16
    is not native; on CPUs bf16 for training where the CPU computes it natively, and float32 for inference and
    evaluation on every CPU, so that the same weights give the same masks on any CPU, the same as the float32 ONNX
    export, and training's evaluation the same scores as --evaluate (docs/precision.md)."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and training and cpu_has_native_bf16() else None
    return AMP_DTYPES[amp]


def use_channels_last(choice: str, device: torch.device, training: bool) -> bool:
    """--channels_last -> NHWC or not. auto: on for GPUs (tensor-core convs want it) and for inference on
    any CPU; for training on a CPU only where it has AVX-512 (bench/README.md has the measurements)."""
    if choice != "auto":
        return choice == "on"
    if device.type != "cpu" or not training:
        return True
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def init_distributed(backend, timeout):
    """The default process group; `timeout` bounds every wait, so a round that cannot form fails and torchrun
    retries. On one node torchrun keeps one store for all its restarts, so a restarted round could read the killed
    round's addresses and fail to connect, or wait on them forever: the keys go in a namespace of this round. Each
    node's agent counts its own restarts, so on several nodes that count is no shared round name: there, torchrun
    must give each round a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README's command sets)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) == 1:
        store = dist.PrefixStore(f"restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    elif int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and rank == 0 \
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        print("warning: several nodes share torchrun's store across restarts; start torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that a restarted round cannot meet the previous round's keys")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class StopRequest:
    """First Ctrl-C (SIGINT) or SIGTERM: training finishes the step, saves a checkpoint and exits; a second Ctrl-C
    aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint after this step (under torchrun: at the next log step; Ctrl-C "
              "again to abort)", file=sys.stderr)

    def agreed(self, device):
        """Under DDP every rank stops at the same step: the flag is max-reduced."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
