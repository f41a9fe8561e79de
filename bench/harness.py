"""Shared bench plumbing: interleaved timing, FLOP counting, peak memory, the machine header, and
appending a dated results block to bench/README.md.

Every bench compares candidates measured in ONE run, round-robin (A, B, C, A, B, C, ...), and
reports medians: the machine is shared, so a load spike hits all candidates alike and the
ratios stay meaningful even when absolute numbers move.
"""
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime import atomic_write, cpu_has_native_bf16, size_arg

README = Path(__file__).resolve().parent / "README.md"
# H100 SXM dense bf16 tensor-core peak (TFLOP/s); the MFU denominator on CUDA unless --peak_tflops says otherwise.
H100_BF16_DENSE_TFLOPS = 989.0
# AVX2: 2 FMA units x 8 fp32 lanes x 2 FLOP per FMA = 32 fp32 FLOP per cycle per core.
AVX2_FP32_FLOP_PER_CYCLE = 32


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_ghz():
    """Nominal clock from /proc/cpuinfo (the first core's 'cpu MHz'); turbo is not accounted for."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1]) / 1000
    return 2.0


def add_step_arguments(parser):
    """The flags of the benches that time one training step: device, batch, size, model, timing, peak."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per step (default: 1)")
    parser.add_argument("--image_size", type=size_arg, default=(512, 256), help="WxH (default: 512x256)")
    parser.add_argument("--base_channels", type=int, default=64, help="UNet width (default: 64, the classic)")
    parser.add_argument("--depth", type=int, default=4, help="UNet depth (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--peak_tflops", type=float, help="peak for the %% of peak column")
    parser.add_argument("--record", action="store_true", help="append the results to bench/README.md")


def peak_tflops(args, device):
    """(peak TFLOP/s, how it was chosen): --peak_tflops when given, else default_peak_tflops."""
    return (args.peak_tflops, "--peak_tflops") if args.peak_tflops else default_peak_tflops(device)


def default_peak_tflops(device):
    """(peak TFLOP/s, how it was chosen) for MFU when --peak_tflops is not given."""
    if device.type == "cuda":
        return H100_BF16_DENSE_TFLOPS, "H100 SXM dense bf16 (pass --peak_tflops for another card or dtype)"
    cores, ghz = torch.get_num_threads(), cpu_ghz()
    peak = cores * ghz * AVX2_FP32_FLOP_PER_CYCLE / 1000
    return peak, f"CPU fp32 estimate: {cores} threads x {ghz:.2f} GHz x {AVX2_FP32_FLOP_PER_CYCLE} FLOP/cycle (AVX2 FMA)"


def machine_header(device):
    """One line naming what was measured on: date, CPU, cores, GPU, torch version, load."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    load = os.getloadavg()[0]
    return (f"{datetime.now():%Y-%m-%d %H:%M}, {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} "
            f"torch threads), {gpu}, torch {torch.__version__}, load average {load:.2f}")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(candidates, repeats, device, warmup=1):
    """{name: [seconds per call]}: each callable run `warmup` times, then `repeats` rounds round-robin."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    synchronize(device)
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values):
    return statistics.median(values)


def count_flops(run):
    """FLOPs of one call of `run` (matmuls and convolutions, forward and backward, as PyTorch counts them)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _proc_status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {field} field (Linux only)")


def _probe_peak_rss(build, args, queue):
    """Child process body: build a candidate, then report how far one call lifts the resident set (MiB).

    VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a spawned child would start at its
    parent's high-water mark and hide everything below it."""
    run = build(*args)
    before = _proc_status_kib("VmRSS")
    run()
    queue.put((_proc_status_kib("VmHWM") - before) / 1024)


def peak_memory_mib(build, args, device):
    """Peak memory of the first call of build(*args)() beyond what building it took, in MiB (for a
    training step: activations, gradients and the optimizer state it creates).

    CUDA: max_memory_allocated, in process. CPU: the resident-set high-water mark of a fresh (spawned)
    process per candidate, since freed memory that the allocator keeps would hide a later candidate's.
    """
    if device.type == "cuda":
        run = build(*args)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_probe_peak_rss, args=(build, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def format_table(header, rows):
    """Markdown table from a header list and rows of already-formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title, header_line, body):
    """Write the raw results block, with the command that made it and the CPU's kind, to a new dated file
    bench/records/DATE-HHMM-TITLE.md, and add one row for it at the end of bench/README.md's table (date,
    machine, command, link): the README stays one table, and every number keeps its source."""
    command = " ".join([f"python -m bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]])
    stamp = re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d", header_line)  # the header's date: file, row and block agree
    when = datetime.strptime(stamp.group(), "%Y-%m-%d %H:%M") if stamp else datetime.now()
    cpu_kind = f"{torch.backends.cpu.get_cpu_capability()}, {'' if cpu_has_native_bf16() else 'no '}native bf16"
    block = f"# {title}, {when:%Y-%m-%d %H:%M}\n\n{header_line}; {cpu_kind}\n\n`{command}`\n\n{body}\n"
    records = README.parent / "records"
    records.mkdir(exist_ok=True)
    stem, copy = f"{when:%Y-%m-%d-%H%M}-{title.replace('_', '-')}", 1
    while True:  # a second run of the same bench in the same minute gets its own file, never overwrites one
        path = records / (f"{stem}.md" if copy == 1 else f"{stem}-{copy}.md")
        try:
            with open(path, "x") as file:
                file.write(block)
            break
        except FileExistsError:
            copy += 1
    # the header without its date (a column of its own), torch threads and load average (both in the record)
    machine = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d, |, \d+ torch threads|, load average [\d.]+$", "", header_line)
    cells = [f"{when:%Y-%m-%d %H:%M}", f"{machine}; {cpu_kind}", f"`{command}`", "not summarised yet",
             f"[record](records/{path.name})"]
    row = "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    lines = README.read_text().splitlines()
    last_row = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines) - 1)
    lines.insert(last_row + 1, row)
    atomic_write(README, lambda file: file.write(("\n".join(lines) + "\n").encode()))
    print(f"recorded in {path}, and a row for it in {README}")


def report(title, header_line, body, record_it):
    """Print a results block, and record it when --record was given."""
    print(body)
    if record_it:
        record(title, header_line, body)


def main(run, parse_args, errors=(ValueError, FileNotFoundError)):
    """A bench script's entry point: expected failures become one `error:` line and exit status 2."""
    arguments = parse_args()
    try:
        run(arguments)
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
