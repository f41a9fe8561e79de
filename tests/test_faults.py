"""Faults that are not the code's: a killed DDP worker under torchrun's restarts, a full disk while saving, a
data file that vanishes mid-run, a checkpoint that does not fit the flags. Each ends in one line naming the file
or the flag, never in a hang, and never costs the last good checkpoint."""
import errno
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import batches
import runtime
import synthetic_city
import training
from bench import restarts
from conftest import TINY, torch_threads

REPO = Path(__file__).resolve().parents[1]



pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def city(make_cityscapes):
    return make_cityscapes(size=(32, 16), counts={"train": 8, "val": 4}, block=4, noise=10)


def train(city, run_dir, *extra):
    training.main(["--data_root", str(city), "--out_dir", str(run_dir), "--model_path", str(run_dir / "model.pth"),
                   *TINY, *extra])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_if_never_killed(tmp_path):
    """torchrun --max_restarts: one worker SIGKILLed at a plain step, the other in the evaluation + checkpoint
    step; each job finishes by itself with the uninterrupted run's weights, bit for bit, every step logged once."""
    city = tmp_path / "city"
    synthetic_city.generate(city, 8, 4, size=(32, 16), seed=0, workers=1)
    code, _, _ = restarts.run_with_a_kill(city, tmp_path / "reference", ("step", 10**9), 0, timeout=240)
    assert code == 0, (tmp_path / "reference.log").read_text()[-3000:]
    for name, trigger, rank in (("plain", ("step", 10), 1), ("evaluation", ("evaluation", restarts.EVAL_EVERY), 0)):
        code, _, killed = restarts.run_with_a_kill(city, tmp_path / name, trigger, rank, timeout=240)
        assert killed and code == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert restarts.same_weights(tmp_path / name, tmp_path / "reference")
        assert restarts.logged_steps(tmp_path / name) == list(range(1, restarts.STEPS + 1))


@pytest.mark.parametrize("nodes, fresh_store, namespace, warns", [("1", None, "restart_3/", False),
                                                                  ("2", None, "", True), ("2", "1", "", False)])
def test_restart_rounds_get_their_own_keys_on_one_node_and_a_fresh_store_on_several(monkeypatch, capsys, nodes,
                                                                                  fresh_store, namespace, warns):
    """One node: keys under the restart count; several nodes (whose agents count restarts apart): no namespace,
    and, when restarts are allowed, a warning unless torchrun gives every round a fresh store."""
    seen = {}
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend, store, **kwargs: seen.update(store=store))
    environment = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                   "TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_MAX_RESTARTS": "3", "GROUP_WORLD_SIZE": nodes}
    for key, value in {**environment, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": fresh_store}.items():
        monkeypatch.setenv(key, value) if value is not None else monkeypatch.delenv(key, raising=False)
    runtime.init_distributed("gloo", timedelta(seconds=30))
    store = seen["store"]
    store.set("key", "value")
    underlying = store.underlying_store if isinstance(store, torch.distributed.PrefixStore) else store
    assert underlying.get(namespace + "key") == b"value"
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().out) == warns


def free_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def fail_writes_of(monkeypatch, name, after=0):
    """Make the disk 'full' for writes of files called `name` (after `after` successful ones): fsync fails with
    ENOSPC, as it does when a full disk meets buffered data."""
    real_fsync, written = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{name}."):
            written.append(name)
            if len(written) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(runtime.os, "fsync", fsync)


FULL_DISK_RUN = ["--training_iterations", "6", "--save_model_interval", "2", "--eval_interval", "2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """(data, run folder) of an uninterrupted run of FULL_DISK_RUN, shared by the full-disk cases."""
    folder = tmp_path_factory.mktemp("full_disk")
    city = folder / "city"
    synthetic_city.generate(city, 8, 4, size=(32, 16), seed=0, workers=1)
    with torch_threads(1):
        train(city, folder / "reference", *FULL_DISK_RUN)
    return city, folder / "reference"


@pytest.mark.parametrize("name, after", [("checkpoint.pt", 1), ("best_model.pth", 1), ("training_curves.png", 0),
                                         ("metrics.jsonl", 0)])
def test_a_full_disk_names_the_file_keeps_the_last_checkpoint_and_the_resume_is_exact(reference_run, tmp_path,
                                                                                      monkeypatch, capsys, name, after):
    city, reference = reference_run
    args = FULL_DISK_RUN
    run_dir = tmp_path / "full"
    fail_writes_of(monkeypatch, name, after)
    with pytest.raises(SystemExit) as exit_info:
        train(city, run_dir, *args)
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert error == [f"error: {run_dir / name}: could not write it (No space left on device)"]
    assert not list(run_dir.glob(".*.tmp"))  # no half-written file left behind
    if (run_dir / "checkpoint.pt").exists():
        assert load(run_dir / "checkpoint.pt")["step"] in (2, 4, 6)  # a complete, earlier checkpoint
    monkeypatch.undo()
    training.main(["--resume", "auto", "--out_dir", str(run_dir)] if (run_dir / "checkpoint.pt").exists()
                  else ["--data_root", str(city), "--out_dir", str(run_dir), "--model_path", str(run_dir / "model.pth"),
                        *TINY, *args])
    expected, got = load(reference / "checkpoint.pt"), load(run_dir / "checkpoint.pt")
    assert got["step"] == 6 and all(torch.equal(got["model"][k], v) for k, v in expected["model"].items())
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_a_data_file_that_vanishes_mid_run_is_one_line_naming_it(city, tmp_path, monkeypatch, capsys):
    vanished = sorted(city.glob("leftImg8bit/train/*/*.png"))[0]
    read, calls = batches.SeededSamples.__getitem__, []

    def read_then_delete(self, key):
        calls.append(key)
        if len(calls) == 6:
            vanished.unlink()
        return read(self, key)

    monkeypatch.setattr(batches.SeededSamples, "__getitem__", read_then_delete)
    with pytest.raises(SystemExit) as exit_info:
        train(city, tmp_path / "run", "--training_iterations", "40", "--save_model_interval", "2")
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [f"error: {vanished}: cannot read PNG (No such file or directory)"]
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] >= 2


def test_a_checkpoint_that_does_not_fit_the_flags_is_one_line(city, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(city, run_dir, "--training_iterations", "2")
    capsys.readouterr()
    for flags, line in ((["--base_channels", "8"], "--base_channels 8: {} was trained with --base_channels 4; its "
                                                   "weights have that shape"),
                        (["--classes", "road", "car"], "--classes road car: {} was trained with the dataset's default "
                                                       "classes; its model predicts those classes"),
                        (["--input_norm", "photo"], "--input_norm photo: {} was trained with --input_norm dataset; its "
                                                    "weights learned from inputs normalised that way")):
        with pytest.raises(SystemExit) as exit_info:
            training.main(["--resume", "auto", "--out_dir", str(run_dir), "--training_iterations", "3", *flags])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {line.format(run_dir / 'checkpoint.pt')}\n"
    checkpoint = load(run_dir / "checkpoint.pt")
    checkpoint["torch_version"] = "2.11.0+cu130"
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    training.main(["--resume", "auto", "--out_dir", str(run_dir), "--training_iterations", "3"])
    assert (f"{run_dir / 'checkpoint.pt'} was written by torch 2.11.0+cu130, this is torch {torch.__version__}"
            in capsys.readouterr().out)
    assert load(run_dir / "checkpoint.pt")["step"] == 3


def test_a_new_run_never_overwrites_an_old_one_and_a_run_folder_resumes(city, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(city, run_dir, "--training_iterations", "2")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(city, run_dir, "--training_iterations", "2")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {run_dir}: holds a run already; continue it with --resume auto, or "
                                       f"choose another --out_dir\n")
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    training.main(["--resume", str(run_dir), "--training_iterations", "3"])  # the folder names its checkpoint
    assert load(run_dir / "checkpoint.pt")["step"] == 3
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit):
        training.main(["--resume", str(run_dir), "--training_iterations", "4"])
    assert capsys.readouterr().err.endswith(f"error: {run_dir / 'metrics.jsonl'}: line 1 is not a JSON record; move "
                                            f"the file away to start its log afresh\n")


def test_an_uncaught_error_with_loader_workers_alive_exits_instead_of_hanging(tmp_path):
    """Loader workers ignore SIGTERM (the main process decides when to stop), and multiprocessing's exit handler
    stops daemonic children with SIGTERM and then joins them: a loader that an uncaught error's traceback kept
    alive used to make the interpreter wait for its worker forever."""
    script = tmp_path / "crash.py"
    script.write_text("import torch\n"
                      "from torch.utils.data import DataLoader\n"
                      "from batches import loader_options\n"
                      "loader = DataLoader(list(range(100)), batch_size=2, **loader_options(1, torch.device('cpu'), 0))\n"
                      "next(iter(loader))\n"
                      "raise RuntimeError('a crash with a worker alive')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and result.stderr.strip().endswith("RuntimeError: a crash with a worker alive")
