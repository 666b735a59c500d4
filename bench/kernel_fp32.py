"""The fp32 tanh recurrence: charrnn/kernels/fp32 (C kernels) against TanhRNNLayer(bf16=False),
which runs one MKL matmul per step. Prints figures; not a test.

    .venv/bin/python bench/kernel_fp32.py [--reps 30] [--sizes 512,256] [--threads 1,2]

For each hidden size (batch 32, 35 steps, the seed's) and thread count: the time of a whole
layer's forward + backward (autograd, every gradient) per minibatch, the sides alternated rep by
rep, medians; and the C step loops alone (Loops.forward + Loops.backward). GFLOP/s counts the
recurrence only: 2*B*h*h per step forward and as many backward.

"% peak" is of the FMA peak measured here (Loops.fma_peak: independent multiply-add chains in
the variant's vectors, one thread, the best of 5 runs before each size and of the ones before)
times the threads. The nominal figure, from the
clock in /proc/cpuinfo ("cpu MHz", which a VM may report without boost) x 32 flops/cycle for AVX2
(2 FMA units x 8 lanes x 2) and x 64 for AVX-512 (Zen 5's full-width 512-bit FMA units), is
printed beside it; where the two differ, the measured one is the clock the core really runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch                                            # noqa: E402

from charrnn.kernels import build, fp32                 # noqa: E402
from charrnn.kernels.fused import TanhRNNLayer          # noqa: E402

FLOPS_PER_CYCLE = {"avx512-fp32": 64, "avx2-fp32": 32, "generic-fp32": 16}


def clock_ghz() -> float | None:
    mhz = build.cpu_info().mhz
    return mhz / 1000 if mhz else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--variants", default=",".join(fp32.variants()))
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch's threads for its ops (both sides); 0: the same as the kernel's")
    args = ap.parse_args()
    B, S, V = args.batch, args.steps, 28
    ghz = clock_ghz()
    names = [v for v in args.variants.split(",") if v]
    peaks = {}
    for v in names:
        k, why = fp32.load(v)
        if k is not None:
            peaks[v] = max(k.fma_peak() for _ in range(5))
            nominal = f", nominal {ghz * FLOPS_PER_CYCLE[v]:.0f}" if ghz else ""
            print(f"{v}: {k}, one core's measured FMA peak {peaks[v]:.0f} GFLOP/s{nominal}")
        else:
            print(f"{v}: unavailable: {why}")
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]} on {os.cpu_count()} CPUs")
    print(f"torch threads: {args.torch_threads or 'as the kernel'}")
    print(f"clock {ghz} GHz (cpu MHz); torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; batch {B}, steps {S}, medians of {args.reps}")
    print()
    header = (f"{'h':>4} {'thr':>3} {'side':<14} {'fwd+bwd ms':>10} {'GF/s':>6} {'vs MKL':>7} "
              f"{'loops ms':>9} {'loop GF/s':>9} {'% peak':>7}")
    print(header)
    print("-" * len(header))
    for h in [int(x) for x in args.sizes.split(",")]:
        g = torch.Generator().manual_seed(0)
        X = torch.randint(0, V, (S, B), generator=g)
        W_in = (torch.randn(V, h, generator=g) * 0.3).requires_grad_()
        b = torch.zeros(h, requires_grad=True)
        H0 = torch.zeros(B, h, requires_grad=True)
        W = (torch.randn(h, h, generator=g) / h ** 0.5).requires_grad_()
        dHs = torch.randn(S, B, h, generator=g)
        A = torch.randn(S, B, h, generator=g)
        Hs_fixed, out = torch.tanh(A), torch.empty_like(A)
        flops = 2 * (2 * B * h * h * S)                  # the recurrence: forward and backward
        kernels = {v: fp32.load(v)[0] for v in names if fp32.load(v)[0] is not None}
        for v, k in kernels.items():                     # a busy neighbour lowers a measurement:
            peaks[v] = max([peaks[v]] + [k.fma_peak() for _ in range(5)])   # keep the best
        # every (threads, side) runs in each round, in a rotating order: the same load for all
        runs = []
        for T in [int(x) for x in args.threads.split(",")]:
            runs.append((T, "MKL (per step)", lambda T=T: TanhRNNLayer.apply(X, W_in, b, H0, W, False)))
            for v in kernels:
                runs.append((T, v, lambda v=v, T=T: fp32.TanhRNNFp32.apply(X, W_in, b, H0, W, v, T)))
        times = {(T, name): [] for T, name, _ in runs}
        loop_times = {(T, name): [] for T, name, _ in runs if name in kernels}
        for rep in range(args.reps + 2):                     # 2 warm-up rounds
            order = runs[rep % len(runs):] + runs[:rep % len(runs)]
            for T, name, layer in order:
                torch.set_num_threads(args.torch_threads or T)
                for p in (W_in, b, H0, W):
                    p.grad = None
                t0 = time.perf_counter()
                layer().backward(dHs)
                dt = time.perf_counter() - t0
                if name in kernels:
                    t1 = time.perf_counter()
                    kernels[name].forward(A, H0.detach(), W.detach(), T, out=out)
                    kernels[name].backward(dHs, Hs_fixed, W.detach(), T)
                    lt = time.perf_counter() - t1
                if rep >= 2:
                    times[T, name].append(dt)
                    if name in kernels:
                        loop_times[T, name].append(lt)
        for T, name, _ in runs:
            base = statistics.median(times[T, "MKL (per step)"])
            m = statistics.median(times[T, name])
            line = f"{h:>4} {T:>3} {name:<14} {m * 1e3:>10.2f} {flops / m / 1e9:>6.1f} {base / m:>6.2f}x"
            if name in kernels:
                lm = statistics.median(loop_times[T, name])
                line += f" {lm * 1e3:>9.2f} {flops / lm / 1e9:>9.1f} {100 * flops / lm / (peaks[name] * T * 1e9):>6.0f}%"
            print(line, flush=True)
        print()
    print("measured FMA peaks, one core, best of all the measurements: "
          + ", ".join(f"{v} {p:.0f} GFLOP/s" for v, p in peaks.items()))
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]} on {os.cpu_count()} CPUs")

if __name__ == "__main__":
    main()
