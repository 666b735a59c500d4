"""Benchmark: training speed and quality of every kernel that runs here (charrnn/kernels: the C
loops, bf16, the fused torch layer, the seed's step-by-step loop) against each other and the d2l
package itself, when its harness is given, plus generation latency.

    python -m charrnn bench --models scratch,rnn --epochs 20 --rounds 3
    python -m charrnn bench --peer ../shared/bench/d2l_baseline.py --peer-python .peer-venv/bin/python

Each measurement is a fresh `python -m charrnn train --json` process (or the peer's), run in
turn, round after round, so that a noisy machine hurts every side alike; the table shows medians.
The limit is what this CPU's matmul rate allows: the step matmul (batch, hidden) @ (hidden, hidden)
is timed here in each precision, the fastest way training runs it (fp32: the C loops' steps where
they were built, else torch.mm; bf16: the C loops' step matmul, on AMX tiles where the CPU has
them), and one token costs
6 * (hidden^2 + hidden * vocab) FLOPs (forward, and backward for inputs and weights).
The FMA peak is the cores' fp32 rate: clock x 2 FMA units x the vector width (16 lanes with
AVX-512, 8 with AVX2) x 2, an upper bound the CPU may not reach at its real clock or width.
Every row names its kernel and precision. Benchmarks report; they never pass or fail.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import UserError
from . import kernels
from .kernels import bf16 as native, bf16gemm, build, fp32
from .checkpoint import DEFAULT_NAME, checkpoint_dir, load_checkpoint
from .device import resolve_device
from .generate import generate
from .models import DEFAULT_HIDDEN, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 28


def matmul_gflops(rows: int, hidden: int, precision: str = "fp32", seconds: float = 1.0,
                  device: torch.device = torch.device("cpu")) -> float:
    """Measured rate of (rows, hidden) @ (hidden, hidden) on this machine, in GFLOP/s, done the
    fastest way the training path does it: fp32 the C loops' steps (35 a call, the tanh
    included) where they were built, else `torch.mm`; bf16 the C loops' step matmul (AMX tiles
    or MKL), or MKL's call from Python where the loops could not be built; on a GPU, fp32
    `torch.mm` replayed from a CUDA graph, as training replays its steps."""
    if device.type == "cuda":
        return cuda_matmul_gflops(rows, hidden, device)
    if precision == "bf16":
        a, w = torch.randn(rows, hidden).to(torch.bfloat16), torch.randn(hidden, hidden).to(torch.bfloat16)
        out = torch.zeros(rows, hidden)
        loops = native.loops()
        if loops is not None:
            matmuls = lambda n: loops.step_matmuls(a, out, w, n)
        else:
            step = bf16gemm.step_gemm(out.unsqueeze(0), a.unsqueeze(0), w)
            matmuls = lambda n: [step(0, 0) for _ in range(n)]
    elif (c := fp32.load()[0]) is not None:
        steps = 35                           # one call: 35 steps of the recurrence, as a minibatch
        A, H0 = torch.randn(steps, rows, hidden) * 0.1, torch.zeros(rows, hidden)
        w, out = torch.randn(hidden, hidden) / hidden ** 0.5, torch.empty(steps, rows, hidden)
        matmuls = lambda n: [c.forward(A, H0, w, out=out) for _ in range(n // steps)]
    else:
        a, w = torch.randn(rows, hidden), torch.randn(hidden, hidden)
        out = torch.empty(rows, hidden)
        matmuls = lambda n: [torch.mm(a, w, out=out) for _ in range(n)]
    matmuls(70)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        matmuls(140)                         # a multiple of the C loops' 35 steps
        n += 140
    return 2 * rows * hidden * hidden * n / (time.perf_counter() - t0) / 1e9


def cuda_matmul_gflops(rows: int, hidden: int, device: torch.device, reps: int = 100) -> float:
    """The step matmul's rate on a GPU: `reps` of them back to back in one graph, timed over replays."""
    a, w = torch.randn(rows, hidden, device=device), torch.randn(hidden, hidden, device=device)
    out = torch.empty(rows, hidden, device=device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):                   # first use (cuBLAS set-up) outside the capture
        torch.mm(a, w, out=out)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            torch.mm(a, w, out=out)
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    return 2 * rows * hidden * hidden * reps * 20 / seconds / 1e9


def limit_tokens_per_s(hidden: int, precision: str = "fp32", batch: int = 32,
                       device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(tokens/s the matmul rate allows, the rate in GFLOP/s) for a one-layer tanh RNN."""
    rate = matmul_gflops(batch, hidden, precision, device=device)
    flops_per_token = 6 * (hidden * hidden + hidden * VOCAB)
    return rate * 1e9 / flops_per_token, rate


def fma_peak_gflops(cores: int | None = None) -> tuple[float, str] | None:
    """(the fp32 FMA peak of `cores` cores in GFLOP/s, how it was reckoned), from the reported
    clock and flags; None where the clock is unknown."""
    cpu = build.cpu_info()
    flags = cpu.flags or frozenset()
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    if not cpu.mhz:
        return None
    cores = cores or os.cpu_count() or 1
    return (cpu.mhz / 1000 * 2 * lanes * 2 * cores,
            f"{cores} cores x {cpu.mhz / 1000:.2f} GHz x 2 FMA units x {lanes} lanes x 2")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu: {build.cpu_info().summary()}, {os.cpu_count()} cores"


class BenchError(RuntimeError):
    """A benchmark's child process failed. The message is one sentence (the command, how it
    ended, its last error line, and a log file with its whole output), for the CLI to show as is."""


def peak_memory_method() -> str | None:
    """How a child's peak resident memory is measured on this OS:

    "proc"    Linux: VmHWM in /proc/PID/status, the high-water mark of the program the child runs
              (it starts afresh at exec), read while the child runs; the last reading is its peak
              unless memory grew in its final ~50 ms;
    "wait4"   macOS, the BSDs: the kernel's ru_maxrss for that child, which also counts what the
              forked copy of this process held before exec (small next to a training run);
    "psutil"  elsewhere (Windows) when psutil is installed: its peak working set, kept by the OS;
    None      none of these: not measured ("-" in the table).

    Not wait4 on Linux: its ru_maxrss keeps the forked parent's resident size, so a child started
    from a process that has loaded torch reports at least that. Not getrusage(RUSAGE_CHILDREN):
    it is the largest child so far."""
    if sys.platform.startswith("linux") and Path("/proc/self/status").is_file():
        return "proc"
    if hasattr(os, "wait4"):
        return "wait4"
    try:
        import psutil  # noqa: F401
    except ImportError:
        return None
    return "psutil"


def maxrss_mb(maxrss: int, platform: str | None = None) -> int:
    """getrusage's ru_maxrss in MiB: macOS counts it in bytes, Linux and the BSDs in KiB."""
    unit = 1 if (platform or sys.platform) == "darwin" else 1024
    return round(maxrss * unit / 2**20)


def _vm_hwm_bytes(pid: int) -> int | None:
    """The high-water resident size of process `pid` (Linux), None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024          # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _psutil_peak_bytes(pid: int) -> int | None:
    import psutil
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return None                                             # gone, or not ours to read
    return getattr(info, "peak_wset", 0) or info.rss


def _wait(proc: subprocess.Popen) -> int | None:
    """Waits for `proc` (its returncode is set after) and returns its peak memory in MiB, or None."""
    method = peak_memory_method()
    if method == "wait4":
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return maxrss_mb(usage.ru_maxrss)
    read = {"proc": _vm_hwm_bytes, "psutil": _psutil_peak_bytes}.get(method)
    peak = 0
    while True:
        if read is not None:
            peak = max(peak, read(proc.pid) or 0)
        try:
            proc.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            continue
    return round(peak / 2**20) if peak else None


def _fail(cmd: list[str], how: str, stdout: str, stderr: str) -> BenchError:
    """The BenchError for a child that `how` (ended with exit status 1, printed no JSON, ...),
    its whole output saved to a log file that outlives the benchmark."""
    fd, log = tempfile.mkstemp(prefix="charrnn-bench-", suffix=".log", text=True)
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    with os.fdopen(fd, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n{how}\n\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = f": {lines[-1].strip()}" if lines else " with no error output"
    return BenchError(f"The benchmark's run `{shown}` {how}{last}; its full output is in {log}.")


def run_child(cmd: list[str]) -> dict:
    """Run one training process; its last stdout line is JSON. Adds its peak resident memory
    (peak_rss_mb, None where it cannot be measured). BenchError if it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        peak_mb = _wait(proc)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"ended with exit status {proc.returncode}")
        raise _fail(cmd, how, stdout, stderr)
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise _fail(cmd, "printed no JSON result as its last line", stdout, stderr) from None
    if not isinstance(result, dict):
        raise _fail(cmd, "printed JSON that is not an object as its last line", stdout, stderr)
    result["peak_rss_mb"] = peak_mb
    return result


CUDA_SIDES = {
    "fp32": [],                                        # cuDNN, replayed from a CUDA graph (the default)
    "eager": ["--no-cuda-graphs"],                     # cuDNN, op by op
    "reference": ["--kernel", "reference", "--no-cuda-graphs"],  # the seed's loop, op by op
    "reference+graph": ["--kernel", "reference"],      # the seed's loop, recorded
}


def cpu_sides(model: str) -> list[str]:
    """The kernels that train `model` (the seed's size) on this CPU, best first."""
    config = ModelConfig(model, VOCAB, DEFAULT_HIDDEN[model])
    return [name for name, why in kernels.choices(config, "cpu").items() if why is None]


def ours(model: str, epochs: int, side: str) -> dict:
    """One of our sides: a kernel's name on a CPU, a CUDA_SIDES entry on a GPU."""
    flags = CUDA_SIDES[side] if side in CUDA_SIDES else ["--kernel", side]
    cmd = [sys.executable, "-m", "charrnn", "train", "--model", model, "--epochs", str(epochs),
           "--json", "--quiet"] + flags
    return run_child(cmd)


def peer(harness: str, python: str, model: str, epochs: int) -> dict:
    which = "scratch" if model == "scratch" else "concise"
    return run_child([python, harness, str(epochs), which, "sequential"])


def generation_ms(length: int = 500, repeats: int = 5) -> float | None:
    """Median time to generate `length` characters greedily from the shipped checkpoint."""
    path = checkpoint_dir() / f"{DEFAULT_NAME}.safetensors"
    if not path.exists():
        return None
    loaded = load_checkpoint(path)
    generate(loaded.model, loaded.vocab, "time traveller", 20)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(loaded.model, loaded.vocab, "time traveller", length)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(args) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in DEFAULT_HIDDEN]
    if not models or unknown:
        raise UserError(f"--models takes a comma-separated list of {', '.join(DEFAULT_HIDDEN)}, "
                         f"not {args.models!r}.")
    if args.rounds < 1 or args.epochs < 1:
        raise UserError("--rounds and --epochs must be at least 1.")
    if args.peer and not Path(args.peer).is_file():
        raise UserError(f"No benchmark harness at {args.peer}.")
    device = resolve_device("auto")                 # where the children train (their default)
    if device.type == "cuda":
        sides = {m: [side for side in CUDA_SIDES if m == "scratch" or not side.startswith("reference")]
                 for m in models}                # the concise models' reference is cuDNN's layer too
    else:
        sides = {m: cpu_sides(m) for m in models}
    if args.peer:
        for m in ("scratch", "rnn"):            # the peer covers the book's two models
            if m in sides:
                sides[m].append("d2l")
    peer_python = args.peer_python or sys.executable
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for model in models:
            for side in sides[model]:
                if side == "d2l":
                    res = peer(args.peer, peer_python, model, args.epochs)
                else:
                    res = ours(model, args.epochs, side)
                results.setdefault((model, side), []).append(res)
                print(f"round {r + 1} {model:<8} {side:<15} {res['tokens_per_s']:>9,.0f} tokens/s  "
                      f"ppl {res['perplexity']:.3f}", file=sys.stderr, flush=True)
    peak = fma_peak_gflops() if device.type == "cpu" else None
    rows = []
    for model in models:
        hidden = DEFAULT_HIDDEN[model]
        flops_per_token = 6 * (hidden * hidden + hidden * VOCAB)
        limits = {p: limit_tokens_per_s(hidden, p, device=device) for p in ("fp32", "bf16")
                  if p == "fp32" or any(r.get("precision") == "bf16" for (m, _), rs in results.items()
                                         if m == model for r in rs)}
        base = results.get((model, "d2l")) or results.get((model, "reference")) or results[(model, sides[model][0])]
        base_tps = statistics.median(x["tokens_per_s"] for x in base)
        for side in sides[model]:
            runs = results[(model, side)]
            tps = statistics.median(x["tokens_per_s"] for x in runs)
            precision = runs[0].get("precision", "fp32")
            limit, rate = limits[precision]
            rows.append({
                "model": model, "hidden": hidden, "side": side, "kernel": runs[0].get("kernel", side),
                "precision": precision, "epochs": args.epochs,
                "tokens_per_s": round(tps), "vs_baseline": round(tps / base_tps, 2),
                "perplexity": round(statistics.median(x["perplexity"] for x in runs), 4),
                "limit_tokens_per_s": round(limit), "fraction_of_limit": round(tps / limit, 3),
                "matmul_gflops": round(rate, 1), "gflops": round(tps * flops_per_token / 1e9, 1),
                "fraction_of_fma_peak": round(tps * flops_per_token / 1e9 / peak[0], 3) if peak else None,
                "peak_rss_mb": max((x.get("peak_rss_mb") or 0) for x in runs) or None,
                "peak_gpu_mb": max((x.get("peak_gpu_mb") or 0) for x in runs) or None,
                "rounds": len(runs)})
    gen = generation_ms()
    baseline = "d2l" if args.peer else "reference" if device.type != "cuda" else "reference (scratch), fp32 (the others)"
    print(f"\nbaseline: {baseline} (the ratio column); {args.rounds} rounds of {args.epochs} epochs, medians; "
          f"limit: the step matmul's measured rate in the row's precision, the fastest way training runs it")
    print(f"device: {device_name(device)}")
    if peak:
        print(f"FMA peak: {peak[0]:.0f} GFLOP/s ({peak[1]})")
    print(f"{'model':<8} {'side':<15} {'precision':<9} {'tokens/s':>10} {'ratio':>6} {'ppl':>8} {'limit':>9} "
          f"{'of limit':>8} {'GFLOP/s':>8} {'of peak':>7} {'peak MB':>8}")
    for row in rows:
        of_peak = f"{row['fraction_of_fma_peak']:.0%}" if row["fraction_of_fma_peak"] is not None else "-"
        print(f"{row['model']:<8} {row['side']:<15} {row['precision']:<9} {row['tokens_per_s']:>10,} {row['vs_baseline']:>6.2f} "
              f"{row['perplexity']:>8.3f} {row['limit_tokens_per_s']:>9,} {row['fraction_of_limit']:>8.0%} "
              f"{row['gflops']:>8} {of_peak:>7} {row['peak_rss_mb'] or '-':>8}")
    if gen is not None:
        print(f"generation: 500 characters greedily from the shipped checkpoint in {gen:.1f} ms")
    print(json.dumps({"rows": rows, "generation_500_ms": gen and round(gen, 1), "baseline": baseline,
                      "device": device_name(device), "fma_peak_gflops": peak and round(peak[0]),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
