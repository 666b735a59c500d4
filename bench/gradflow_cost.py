"""What gradient flow through time costs a run: the seed's defaults (scratch RNN-512 and nn.RNN-256,
batch 32, 35 steps, 10,000 training tokens of The Time Machine, kernel auto) trained three ways in
one process, their epochs interleaved (one epoch of each side in turn, the order rotated every
round) so that a shared machine's load falls on every side alike. Prints figures; not a test.

    CHARRNN_DATA=... .venv/bin/python bench/gradflow_cost.py [--epochs 300] [--models scratch,rnn]

    off      the loop without the feature: no sigma_max, no probes
    sigma    sigma_max of W_hh every epoch, no probes (probe_every=0)
    default  sigma_max every epoch and the probes at the default cadence (probe_every=None)

tokens/s is the training tokens over the wall time of the whole epoch: training, validation
perplexity, samples and the feature, which is what a run's length is made of (EpochStats'
tokens_per_s counts the training loop alone and leaves the probes out). The slowdown is each
side's total wall time against off's. Every side trains the same weights bit for bit.

On a machine that others share, a burst of their work makes a few epochs many times longer, and
such a burst can land on any side: "quiet" counts only the rounds in which no side's epoch took
more than SPIKE times its median (whole rounds, so the sides stay paired), "all" every round.
A probe lengthens its epoch by a fraction of it, well below SPIKE, so its rounds stay in.
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

from charrnn.data import load_corpus                     # noqa: E402
from charrnn.kernels import build                       # noqa: E402
from charrnn import train                               # noqa: E402
from charrnn.train import TrainConfig, Trainer          # noqa: E402

SIDES = {"off": 0, "sigma": 0, "default": None}         # probe_every of each side
SPIKE = 2.0


def run_sides(model: str, epochs: int, corpus) -> tuple[dict, bool]:
    """(per side: wall seconds of every epoch, epoch 0 included, tokens, probes and their times;
    whether every side ends with the same weights)."""
    probe_times, gradient_flow = [], train.gradient_flow

    def timed(*args):                                   # only the default side probes
        t0 = time.perf_counter()
        flow = gradient_flow(*args)
        probe_times.append(time.perf_counter() - t0)
        return flow

    train.gradient_flow = timed
    config = TrainConfig(model=model, epochs=epochs)
    trainers = {side: Trainer(dataclasses.replace(config, probe_every=every), corpus)
                for side, every in SIDES.items()}
    trainers["off"].measure = lambda forced=False: (None, None)   # the loop as it was without the feature
    runs = {side: t.run() for side, t in trainers.items()}
    out = {side: {"walls": [], "tokens": 0, "probes": [], "weights": None} for side in SIDES}
    order = list(SIDES)
    for _ in range(epochs + 1):                         # epoch 0, then every trained one
        for side in order:
            t0 = time.perf_counter()
            stats = next(runs[side])
            out[side]["walls"].append(time.perf_counter() - t0)
            if stats.grad_flow is not None:
                out[side]["probes"].append((stats.epoch, probe_times[-1]))
        order = order[1:] + order[:1]
    for side, trainer in trainers.items():
        out[side]["tokens"] = trainer.train_tokens
        out[side]["kernel"] = trainer.kernel.name
        out[side]["weights"] = [p.detach().clone() for p in trainer.model.parameters()]
    train.gradient_flow = gradient_flow
    same = all(all(torch.equal(p, q) for p, q in zip(out["off"]["weights"], out[s]["weights"])) for s in SIDES)
    return out, same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--models", default="scratch,rnn")
    args = p.parse_args()
    corpus = load_corpus("timemachine", "seed", max_tokens=10_000, val_tokens=2_000)
    print(f"CPU: {build.cpu_info().summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for model in args.models.split(","):
        out, same = run_sides(model, args.epochs, corpus)
        medians = {side: statistics.median(o["walls"]) for side, o in out.items()}
        quiet = [r for r in range(1, args.epochs + 1)    # trained epochs: epoch 0 trains no tokens
                 if all(o["walls"][r] <= SPIKE * medians[side] for side, o in out.items())]
        base_all, base_quiet = sum(out["off"]["walls"]), sum(out["off"]["walls"][r] for r in quiet)
        print(f"\n{model}-{TrainConfig(model=model).hidden_size}, kernel {out['off']['kernel']}, "
              f"{args.epochs} epochs ({len(quiet)} quiet rounds), weights identical on every side: {same}")
        print(f"  {'side':8} {'tokens/s all':>13} {'slowdown':>9} {'tokens/s quiet':>15} {'slowdown':>9} "
              f"{'epoch ms':>9} {'probes':>7} {'probe ms':>9}")
        for side, o in out.items():
            wall, wall_quiet = sum(o["walls"]), sum(o["walls"][r] for r in quiet)
            tokens_per_epoch = o["tokens"] / args.epochs
            probe_ms = statistics.median(s for _, s in o["probes"]) * 1e3 if o["probes"] else float("nan")
            print(f"  {side:8} {o['tokens'] / wall:13,.0f} {100 * (wall / base_all - 1):+8.1f}% "
                  f"{tokens_per_epoch * len(quiet) / wall_quiet:15,.0f} {100 * (wall_quiet / base_quiet - 1):+8.1f}% "
                  f"{1e3 * medians[side]:9.1f} {len(o['probes']):7d} {probe_ms:9.1f}")
        epochs = [e for e, _ in out["default"]["probes"]]
        print(f"  default probed epochs: {epochs[:12]}{' ...' if len(epochs) > 12 else ''}")


if __name__ == "__main__":
    main()
