"""Generation speed: 500 characters from the shipped checkpoint, greedy and sampled, the Python
loop (a model call per character) against the C loop (charrnn/kernels/fp32.py, GenerationLoop),
for every C variant this CPU runs (the lower ones forced). Medians of interleaved repeats, in ms.
Prints figures; not a test.

    .venv/bin/python bench/generate_speed.py [--length 500] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charrnn.checkpoint import load_checkpoint  # noqa: E402
from charrnn.generate import generate  # noqa: E402
from charrnn.kernels import build, fp32, select  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default.safetensors"


def cpu_name() -> str:
    return f"{build.cpu_info().summary()}, {fp32.default_threads()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    loaded = load_checkpoint(CHECKPOINT)
    model, vocab = loaded.model, loaded.vocab
    own = model.kernel
    print(f"CPU: {cpu_name()}")
    print(f"model: {model.config}, its kernel {own.name}; {args.length} characters after 'time traveller', "
          f"median of {args.repeats} interleaved repeats")
    rows = []          # (label, set-up, kwargs)

    def kernel_as(name):
        return lambda: setattr(model, "kernel", select(model.config, "cpu", name=name))

    for threads in (1, 2):
        rows.append((f"python loop, kernel {own.name}, {threads} thread(s)", kernel_as(own.name), threads,
                     dict(loop="python")))
    rows.append(("python loop, kernel torch-fp32", kernel_as("torch-fp32"), 1, dict(loop="python")))
    for v in fp32.variants():
        if fp32.load(v)[0] is not None:
            rows.append((f"C loop {v}", kernel_as(own.name), 1, dict(loop=v)))
    modes = {"greedy": {}, "sampled": dict(temperature=0.8, seed=1)}
    times = {(label, m): [] for label, *_ in rows for m in modes}
    paths = {}
    before = torch.get_num_threads()
    for r in range(args.repeats + 1):                      # round 0 warms up (builds, caches)
        for label, setup, threads, kw in rows:
            setup()
            torch.set_num_threads(threads)
            for m, mkw in modes.items():
                t0 = time.perf_counter()
                g = generate(model, vocab, "time traveller", args.length, **kw, **mkw)
                if r:
                    times[(label, m)].append((time.perf_counter() - t0) * 1e3)
                paths[label] = g.path
    torch.set_num_threads(before)
    model.kernel = own
    from charrnn.bench import generation_ms
    print(f"charrnn.bench.generation_ms(): {generation_ms():.2f} ms (what `python -m charrnn bench` prints)")
    print(f"{'path':<44} {'ran':<18} {'greedy ms':>10} {'sampled ms':>11}")
    for label, *_ in rows:
        g, s = (statistics.median(times[(label, m)]) for m in modes)
        print(f"{label:<44} {paths[label]:<18} {g:>10.2f} {s:>11.2f}")


if __name__ == "__main__":
    main()
