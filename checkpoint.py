"""The training checkpoint, checkpoint.pt: its one writer and reader.

It holds the weights file's contents, the weights that are evaluated (so inference.py reads it too), plus
everything a run needs to continue bit for bit: the trained weights when they differ (a weight average is
evaluated), optimizer, LR schedule, GradScaler, the resolved config, each rank's RNG states and the progress.
"""
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime import UserError, load_torch_file, save_torch_file

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Progress:
    """Where a run stands."""

    step: int = 0
    samples_seen: int = 0
    best_miou: float = -1.0
    best_step: int | None = None
    nonfinite_steps: int = 0
    seconds: float = 0.0  # wall time so far, setup included, over every process of the run (--time_budget)


def rng_state():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}  # this rank's GPU


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0])


def save_checkpoint(path, weights, optimizer, scheduler, scaler, config, progress, rank, world_size):
    """Write the full training state. Called on every rank (it gathers each rank's RNG state); rank 0 writes."""
    states = [rng_state()]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
    if rank == 0:
        save_torch_file({**weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "config": config.to_dict(), "rng": states, **vars(progress)},
                        path)


def read_checkpoint(path) -> dict:
    """A training checkpoint as save_checkpoint wrote it; one line naming the file for anything else."""
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint:
        raise UserError(f"{path}: not a training checkpoint (--resume needs a run folder's {CHECKPOINT_FILE}, not "
                        f"the inference weights)")
    if checkpoint.get("torch_version", str(torch.__version__)) != str(torch.__version__):
        print(f"{path} was written by torch {checkpoint['torch_version']}, this is torch {torch.__version__}: "
              f"resuming, but the continuation may differ in the last bits from one on the original version")
    return checkpoint


def restore(checkpoint, model, optimizer, scheduler, scaler, rank, world_size) -> Progress:
    """Continue from a checkpoint: model, optimizer, schedule, GradScaler and this rank's RNGs; returns the
    progress. (With a weight average, "model" holds the average and "trained_model" the trained weights.)"""
    model.load_state_dict(checkpoint.get("trained_model", checkpoint["model"]))
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    if len(checkpoint["rng"]) == world_size:
        set_rng_state(checkpoint["rng"][rank])
    elif rank == 0:
        print(f"resuming a run of {len(checkpoint['rng'])} processes on {world_size}: the data stream continues where "
              f"it stopped, with {world_size} ranks' blocks per step; dropout draws will differ")
    return Progress(**{key: checkpoint[key] for key in vars(Progress()) if key in checkpoint})


def find_resume_checkpoint(resume, out_dir):
    """The checkpoint --resume names: a path, or auto = <out_dir>/checkpoint.pt when out_dir is given, else the
    newest runs/*/checkpoint.pt; None for a new run."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume) / CHECKPOINT_FILE if os.path.isdir(resume) else Path(resume)  # a run folder will do
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found (--resume)")
        return str(path)
    candidates = [Path(out_dir) / CHECKPOINT_FILE] if out_dir else sorted(Path("runs").glob(f"*/{CHECKPOINT_FILE}"),
                                                                          key=os.path.getmtime)
    found = [str(path) for path in candidates if path.is_file()]
    if not found:
        print("--resume auto: no checkpoint found, starting a new run")
    return found[-1] if found else None
