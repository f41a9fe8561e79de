"""Elastic restarts: kill one DDP worker of `torchrun --max_restarts` at varied moments and check that the job
finishes by itself, ends with the weights of an uninterrupted run, bit for bit, and logs every step once.

    python -m bench.restarts                       # 20 kills, 2 CPU processes (gloo), a tiny model
    python -m bench.restarts --kills 40 --record

Each trial runs the README's elastic command on a tiny synthetic city (40 steps, a checkpoint every 4, an
evaluation every 20) and SIGKILLs one worker, alternating ranks: at a step taken from a spread over the run,
while a checkpoint is being written (its temporary file exists), or right after an evaluation's snapshot.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import synthetic_city
from bench import harness

REPO = Path(__file__).resolve().parent.parent
BENCH_OUT = REPO / "bench" / "out"
STEPS, SAVE_EVERY, EVAL_EVERY = 40, 4, 20


def elastic_command(data_root, run_dir, max_restarts=2):
    """torchrun with 2 CPU workers, restarting failed rounds, each round resuming the run folder's checkpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max_restarts={max_restarts}", str(REPO / "training.py"), "--data_root", str(data_root),
            "--image_size", "32x16", "--base_channels", "4", "--depth", "2", "--batch_size", "2", "--accum_steps", "1",
            "--warmup_steps", "1", "--log_interval", "1", "--num_workers", "0", "--device", "cpu",
            "--training_iterations", str(STEPS), "--save_model_interval", str(SAVE_EVERY), "--eval_interval",
            str(EVAL_EVERY), "--dist_timeout", "60", "--resume", "auto", "--out_dir", str(run_dir), "--model_path",
            str(run_dir / "model.pth")]


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1] if '"train_loss"' in line]


def trigger_reached(run_dir, trigger):
    """trigger: ("step", N), ("checkpoint", N) = a checkpoint being written after step N, ("evaluation", N)."""
    kind, step = trigger
    steps = logged_steps(run_dir)
    if kind == "step":
        return bool(steps) and steps[-1] >= step
    if kind == "checkpoint":
        return bool(steps) and steps[-1] >= step and any(run_dir.glob(".checkpoint.pt.*.tmp"))
    return (run_dir / "snapshots" / f"step_{step:06d}.png").exists()


def run_with_a_kill(data_root, run_dir, trigger, rank, timeout=300):
    """Run the elastic command, SIGKILL worker `rank` once the trigger is reached, wait for the job.
    Returns (exit status or None when it had to be killed after `timeout` s, seconds, whether the kill landed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    shutil.rmtree(run_dir, ignore_errors=True)  # bench output of an earlier run, never user data
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        job = subprocess.Popen(elastic_command(data_root, run_dir), cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    start, killed = time.perf_counter(), False
    while job.poll() is None and time.perf_counter() - start < timeout:
        if not killed and trigger_reached(run_dir, trigger):
            workers = sorted(int(pid) for pid in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                                                text=True).stdout.split())
            if len(workers) == 2:
                os.kill(workers[rank], signal.SIGKILL)
                killed = True
        time.sleep(0.002)
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        return None, time.perf_counter() - start, killed
    return job.returncode, time.perf_counter() - start, killed


def same_weights(run_dir, reference_dir):
    got = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    expected = torch.load(reference_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return got["step"] == STEPS and all(torch.equal(got["model"][k], v) for k, v in expected["model"].items())


def triggers(kills):
    """A spread of kill moments: plain steps over the run, checkpoint writes, the evaluation at step 20."""
    moments = []
    for trial in range(kills):
        kind = ("step", "checkpoint", "evaluation")[trial % 3]
        step = EVAL_EVERY if kind == "evaluation" else 2 + (trial * 7) % (STEPS - 6)
        moments.append((kind, step))
    return moments


def run(args):
    header = harness.machine_header(torch.device("cpu"))
    print(header)
    data_root = BENCH_OUT / "restarts_city"
    synthetic_city.generate(data_root, 8, 4, size=(32, 16), seed=0, workers=1)
    reference = BENCH_OUT / "restarts" / "reference"
    code, seconds, _ = run_with_a_kill(data_root, reference, ("step", 10**9), 0)
    if code != 0:
        raise ValueError(f"the uninterrupted run failed (exit {code}); see {reference}.log")
    rows, successes = [], 0
    for trial, trigger in enumerate(triggers(args.kills)):
        run_dir = BENCH_OUT / "restarts" / f"trial_{trial:02d}"
        code, seconds, killed = run_with_a_kill(data_root, run_dir, trigger, rank=trial % 2)
        steps = logged_steps(run_dir)
        exact = code == 0 and same_weights(run_dir, reference)
        once = steps == list(range(1, STEPS + 1))
        successes += bool(killed and exact and once)
        rows.append([trial, f"{trigger[0]} {trigger[1]}", trial % 2, "yes" if killed else "no",
                     "hung" if code is None else code, f"{seconds:.0f}", "yes" if exact else "no", "yes" if once else "no"])
        print(rows[-1], flush=True)
    body = (f"{args.kills} trials of `torchrun --standalone --nproc_per_node=2 --max_restarts=2 training.py ... --resume "
            f"auto` (gloo, tiny model, {STEPS} steps), one worker SIGKILLed per trial; success = the job ends by itself "
            f"(exit 0), weights bit-identical to an uninterrupted run, every step logged once: "
            f"**{successes} of {args.kills}**\n\n")
    body += harness.format_table(["trial", "killed at", "rank", "kill landed", "exit", "s", "bit-identical",
                                  "steps once"], rows)
    harness.report("restarts", header, body, args.record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="trials, one kill each (default: 20)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    return args


if __name__ == "__main__":
    harness.main(run, parse_args)
