"""Checks and figures for a CUDA GPU in one run, for a machine that is lent for minutes.

    CHARRNN_DATA=... python bench/gpu_check.py [--epochs 40] [--rounds 2] [--out DIR]

1. Same numbers: every model kind and both samplings train a few epochs from one seed with the
   CUDA graph and op by op; the per-epoch perplexities and the final weights are compared.
2. The GPU against the CPU: the scratch RNN in fp32 on both (cuDNN and the CPU's fastest fp32 kernel), same seed.
3. Speed, in process: tokens/s of scratch-512 and rnn-256 (the seed's configuration) for each
   way of running a minibatch, alternating, medians over the epochs after the first few.

Prints what it finds as it goes and one JSON line last (also written to DIR/gpu_check.json).
A benchmark and a check for a person to read: it never fails on a figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from charrnn.data import load_corpus  # noqa: E402
from charrnn.train import TrainConfig, Trainer  # noqa: E402

SIDES = {  # name: (kernel, cuda_graphs)
    "graph": ("auto", True),              # cuDNN (charrnn/kernels), replayed from a CUDA graph (the default)
    "eager": ("auto", False),             # cuDNN, op by op
    "reference": ("reference", False),    # the seed's loop, op by op (scratch only)
    "reference+graph": ("reference", True),
}


def train(corpus, device="cuda", **settings):
    """(trainer, per-epoch stats) of one run."""
    config = TrainConfig(device=device, sample_every=10**6, **settings)
    trainer = Trainer(config, corpus)
    stats = [s for s in trainer.run() if s.epoch > 0]
    return trainer, stats


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max() / (b[k].float().abs().max() + 1e-12))
               for k in a)


def same_numbers(corpus, epochs: int = 6) -> list[dict]:
    rows = []
    cases = [(kind, sampling, "auto") for kind in ("scratch", "rnn", "gru", "lstm") for sampling in ("sequential", "random")]
    cases += [("scratch", "sequential", "reference")]   # the seed's loop (on a GPU rnn is cuDNN's either way)
    for kind, sampling, kernel in cases:
        row = {"model": kind, "sampling": sampling, "kernel": kernel}
        try:
            g, g_stats = train(corpus, model=kind, sampling=sampling, kernel=kernel, epochs=epochs, cuda_graphs=True)
            e, e_stats = train(corpus, model=kind, sampling=sampling, kernel=kernel, epochs=epochs, cuda_graphs=False)
            row.update(
                graphed=g.graphed, graph_failed=g.graph_failed,
                ppl_graph=[round(s.train_ppl, 4) for s in g_stats], ppl_eager=[round(s.train_ppl, 4) for s in e_stats],
                max_ppl_rel_diff=max(abs(a.train_ppl - b.train_ppl) / b.train_ppl for a, b in zip(g_stats, e_stats)),
                weights_rel_diff=max_rel_diff(g.model.state_dict(), e.model.state_dict()))
        except Exception as ex:  # report and go on: the other cases still tell something
            row["error"] = f"{type(ex).__name__}: {ex}"
        print("same numbers", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def gpu_vs_cpu(corpus, epochs: int = 3) -> dict:
    row = {}
    try:
        _, gpu = train(corpus, "cuda", model="scratch", precision="fp32", epochs=epochs)
        _, cpu = train(corpus, "cpu", model="scratch", precision="fp32", epochs=epochs)
        row = {"ppl_gpu": [round(s.train_ppl, 4) for s in gpu], "ppl_cpu": [round(s.train_ppl, 4) for s in cpu],
               "max_ppl_rel_diff": max(abs(a.train_ppl - b.train_ppl) / b.train_ppl for a, b in zip(gpu, cpu))}
    except Exception as ex:
        row["error"] = f"{type(ex).__name__}: {ex}"
    print("gpu vs cpu", json.dumps(row), flush=True)
    return row


def speed(corpus, epochs: int, rounds: int, skip: int = 3) -> list[dict]:
    runs: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for kind in ("scratch", "rnn"):
            for side, (kernel, graphs) in SIDES.items():
                if kind != "scratch" and kernel == "reference":
                    continue                    # nn.RNN on a GPU is cuDNN's either way
                try:
                    trainer, stats = train(corpus, model=kind, kernel=kernel, cuda_graphs=graphs, epochs=epochs)
                    tps = statistics.median(s.tokens_per_s for s in stats[skip:])
                    print(f"round {r + 1} {kind:<8} {side:<16} {tps:>12,.0f} tokens/s  ppl {stats[-1].train_ppl:.3f}"
                          f"  graphed={trainer.graphed}", flush=True)
                    runs.setdefault((kind, side), []).append(tps)
                except Exception as ex:
                    print(f"round {r + 1} {kind:<8} {side:<16} failed: {type(ex).__name__}: {ex}", flush=True)
    return [{"model": kind, "side": side, "tokens_per_s": round(statistics.median(v)), "rounds": len(v)}
            for (kind, side), v in runs.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for gpu_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here.")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    corpus = load_corpus()
    t0 = time.perf_counter()
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "same_numbers": same_numbers(corpus), "gpu_vs_cpu": gpu_vs_cpu(corpus),
              "speed": speed(corpus, args.epochs, args.rounds)}
    print(f"\n{'model':<8} {'side':<16} {'tokens/s':>12}   ({time.perf_counter() - t0:.0f} s in all)")
    for row in result["speed"]:
        print(f"{row['model']:<8} {row['side']:<16} {row['tokens_per_s']:>12,}")
    line = json.dumps(result)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
