"""The fp32 tanh recurrence: charrnn/kernels/fp32 (C kernels) against TanhRNNLayer(bf16=False),
which runs one MKL matmul per step. Prints figures; not a test.

    .venv/bin/python bench/kernel_fp32.py [--reps 30] [--sizes 512,256] [--threads 1,2]

For each hidden size (batch 32, 35 steps, the seed's) and thread count: the time of a whole
layer's forward + backward (autograd, every gradient) per minibatch, the sides alternated rep by
rep, medians; and the C step loops alone (Kernel.forward + Kernel.backward). GFLOP/s counts the
recurrence only: 2*B*h*h per step forward and as many backward. The FMA peak assumed per core is
the clock in /proc/cpuinfo ("cpu MHz", no boost) x 32 flops/cycle for AVX2 (2 FMA units x 8 lanes
x 2) and x 64 for AVX-512 (Zen 5's full-width 512-bit FMA units), x 16 for the generic build
(SSE, 4 lanes, no FMA: 2 units x 4 lanes x 2 ops).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch                                            # noqa: E402

from charrnn.kernels import fp32                        # noqa: E402
from charrnn.models import TanhRNNLayer                 # noqa: E402

FLOPS_PER_CYCLE = {"avx512-fp32": 64, "avx2-fp32": 32, "generic-fp32": 16}


def clock_ghz() -> float | None:
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else None
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--variants", default=",".join(fp32.variants()))
    args = ap.parse_args()
    B, S, V = args.batch, args.steps, 28
    ghz = clock_ghz()
    names = [v for v in args.variants.split(",") if v]
    for v in names:
        k, why = fp32.load(v)
        print(f"{v}: {k if k else 'unavailable: ' + why}")
    print(f"clock {ghz} GHz (cpu MHz, assumed constant); torch {torch.__version__}, "
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
        flops = 2 * (2 * B * h * h * S)                  # the recurrence: forward and backward
        for T in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(T)
            sides = {"MKL (per step)": lambda: TanhRNNLayer.apply(X, W_in, b, H0, W, False)}
            kernels = {}
            for v in names:
                k, _ = fp32.load(v)
                if k is not None:
                    kernels[v] = k
                    sides[v] = (lambda v=v: fp32.TanhRNNFp32.apply(X, W_in, b, H0, W, v, T))
            A = torch.randn(S, B, h, generator=g)
            Hs_fixed = torch.tanh(A)

            def loops(k):
                k.forward(A.clone(), H0.detach(), W.detach(), T)
                k.backward(dHs, Hs_fixed, W.detach(), T)

            times = {name: [] for name in sides}
            loop_times = {name: [] for name in kernels}
            order = list(sides)
            for rep in range(args.reps + 2):                     # 2 warm-up reps
                order = order[1:] + order[:1]                    # alternate who goes first
                for name in order:
                    for p in (W_in, b, H0, W):
                        p.grad = None
                    t0 = time.perf_counter()
                    sides[name]().backward(dHs)
                    dt = time.perf_counter() - t0
                    if name in kernels:
                        t1 = time.perf_counter()
                        loops(kernels[name])
                        lt = time.perf_counter() - t1
                    if rep >= 2:
                        times[name].append(dt)
                        if name in kernels:
                            loop_times[name].append(lt)
            base = statistics.median(times["MKL (per step)"])
            for name in sides:
                m = statistics.median(times[name])
                line = f"{h:>4} {T:>3} {name:<14} {m * 1e3:>10.2f} {flops / m / 1e9:>6.1f} {base / m:>6.2f}x"
                if name in kernels:
                    lm = statistics.median(loop_times[name])
                    peak = ghz * FLOPS_PER_CYCLE[name] * T * 1e9 if ghz else None
                    line += f" {lm * 1e3:>9.2f} {flops / lm / 1e9:>9.1f}"
                    line += f" {100 * flops / lm / peak:>6.0f}%" if peak else "       ?"
                print(line, flush=True)
            print()


if __name__ == "__main__":
    main()
