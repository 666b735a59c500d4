"""The large matmuls of a minibatch around the fp32 C loops, on the C team against MKL, and what
each choice does to training. Prints figures; not a test.

    python bench/minibatch_fp32.py [--variant avx512-fp32] [--sizes 512,256] [--reps 50] [--epochs 30]

1. Each matmul alone (batch 32 x 35 steps = 1120 tokens, vocabulary 28), the sides alternated rep
   by rep (10 calls each, back to back), medians: the recurrent weight gradient H^T dA (Loops.gemm_tn) and the output layer's
   forward, dH and dW (Loops.matmul, gemm_tn) on the team's threads, against torch (MKL) on one
   thread and on as many as the team.
2. Training (The Time Machine, the seed's settings, the model's default size), epochs alternated
   in one process, medians: the output layer on the team against torch's linear, and torch's own
   ops on one thread (charrnn.kernels.run_threads) against on the run's threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch                                            # noqa: E402

from charrnn import kernels                             # noqa: E402
from charrnn.data import load_corpus                    # noqa: E402
from charrnn.device import cpu_threads, default_threads  # noqa: E402
from charrnn.kernels import build, fp32                 # noqa: E402
from charrnn.train import TrainConfig, Trainer          # noqa: E402

TOKENS, VOCAB = 1120, 28


SETTLE_S = 0.05   # between sides: OpenMP's threads stop spinning (~10 ms) before the next side runs
CALLS = 10        # back to back per measurement: the steady state, not the first call's wake-up


def alternate(sides: dict, reps: int) -> dict:
    """Median seconds a call of each side's callable, the sides run in turn, rep after rep: each
    time CALLS calls after SETTLE_S, so that neither side's threads spin on the other's cores."""
    times = {name: [] for name in sides}
    for rep in range(reps + 2):                          # 2 warm-up rounds
        for name, fn in sides.items():
            time.sleep(SETTLE_S)
            fn()
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            if rep >= 2:
                times[name].append((time.perf_counter() - t0) / CALLS)
    return {name: statistics.median(t) for name, t in times.items()}


def matmuls(k, h: int, T: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    H, dA = torch.randn(TOKENS, h, generator=g), torch.randn(TOKENS, h, generator=g)
    Wq, bq, dY = torch.randn(h, VOCAB, generator=g), torch.randn(VOCAB, generator=g), torch.randn(TOKENS, VOCAB, generator=g)

    def mkl(fn, threads):
        def run():
            with cpu_threads(threads):
                fn()
        return run
    cases = {
        "weight gradient H^T dA": (2 * TOKENS * h * h, lambda: k.gemm_tn(H, dA, T), lambda: H.t() @ dA),
        "output layer H Wq + bq": (2 * TOKENS * h * VOCAB, lambda: k.matmul(H, Wq, bq, T), lambda: torch.addmm(bq, H, Wq)),
        "output layer dY Wq^T": (2 * TOKENS * h * VOCAB, lambda: k.matmul(dY, Wq.t(), None, T), lambda: dY @ Wq.t()),
        "output layer dY^T H": (2 * TOKENS * h * VOCAB, lambda: k.gemm_tn(dY, H, T), lambda: dY.t() @ H),
    }
    for what, (flops, team, torch_side) in cases.items():
        m = alternate({"team": team, "MKL 1": mkl(torch_side, 1), f"MKL {T}": mkl(torch_side, T)}, reps)
        print(f"{h:>4} {what:<24} " + "  ".join(
            f"{side} {s * 1e3:6.3f} ms {flops / s / 1e9:5.0f} GF/s" for side, s in m.items())
            + f"   team / MKL {T}: {m[f'MKL {T}'] / m['team']:.2f}x", flush=True)


def training(kind: str, variant: str, epochs: int) -> None:
    """Epochs alternated between ways of running one trainer; tokens/s medians."""
    trainer = Trainer(TrainConfig(model=kind, epochs=1, probe_every=0, kernel=variant), load_corpus())
    list(trainer.run())
    team = trainer.model.kernel
    threads = default_threads()
    sides = {"as it runs": (team, lambda: kernels.run_threads(team, 0)),
             "output layer in torch": (dataclasses.replace(team, head=None), lambda: kernels.run_threads(team, 0)),
             f"torch's ops on {threads} threads": (team, lambda: cpu_threads(threads))}
    rates = {name: [] for name in sides}
    for _ in range(epochs):
        for name, (kernel, context) in sides.items():
            time.sleep(SETTLE_S)
            trainer.model.kernel = kernel
            with context():
                t0 = time.perf_counter()
                _, tokens, _ = trainer.train_epoch()
                rates[name].append(tokens / (time.perf_counter() - t0))
    base = statistics.median(rates["as it runs"])
    print(f"{kind:<8} " + "  ".join(f"{name} {statistics.median(r):,.0f} tok/s ({statistics.median(r) / base:.2f})"
                                     for name, r in rates.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default=None, help="a C fp32 build (default: the best here)")
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=30, help="epochs per side in the training part (0: skip it)")
    args = ap.parse_args()
    k, why = fp32.load(args.variant)
    if k is None:
        sys.exit(f"no C fp32 kernel here: {why}")
    T = default_threads()
    print(f"{build.cpu_info().summary()}; {k.name}, team of {T}; torch {torch.__version__}; medians of {args.reps}")
    for h in [int(x) for x in args.sizes.split(",")]:
        matmuls(k, h, T, args.reps)
    if args.epochs:
        print(f"\ntraining, {k.name}, epochs alternated, medians of {args.epochs}:")
        for kind in ("scratch", "rnn"):
            training(kind, k.name, args.epochs)


if __name__ == "__main__":
    main()
