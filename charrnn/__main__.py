"""The command line: the same work as the app, headless.

    python -m charrnn train --model scratch --epochs 500 --save my-model --json
    python -m charrnn generate --checkpoint default --prefix "time traveller" --length 50
    python -m charrnn list
    python -m charrnn bench --rounds 3

Bad input exits with status 2 and one line on stderr; a diverged run exits with status 1 and one
line, and so does a benchmark whose child run failed (the line names the child's log); an
interrupted run exits with 130. Anything else is a bug in charrnn or below it: it exits with
status 1 and its full traceback, never dressed up as bad input.

`train --save NAME` never replaces an existing checkpoint unless --overwrite is given: a taken name
is refused before training starts, and if the name is taken while the run trains, the model is
saved as NAME-YYYYmmdd-HHMMSS instead.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import (SUFFIX, CheckpointExists, check_writable, list_checkpoints, load_checkpoint,
                         make_metadata, resolve, save_checkpoint)
from . import kernels
from .data import PREPROCESSING, SAMPLERS, load_corpus
from .device import DEVICES
from .errors import UserError
from .generate import MAX_LENGTH, check_sampling, generate
from .models import KINDS
from .ngram import corpus_ngram_perplexities
from .jobs import continued_trainer
from .train import KERNELS, OPTIMIZERS, PRECISIONS, TrainConfig, Trainer, TrainingDiverged

USER_ERRORS = (UserError,)  # -> exit 2, one line (CorpusError, CheckpointError and the settings checks)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str, status: int = 2):
    print(f"charrnn: error: {message}", file=sys.stderr)
    sys.exit(status)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m charrnn", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a model and optionally save it")
    t.add_argument("--corpus", default="timemachine", help="timemachine (downloaded, cached) or a path to a UTF-8 .txt")
    t.add_argument("--preprocessing", choices=PREPROCESSING, default="seed",
                   help="seed: lowercase letters and spaces (28 tokens); raw: every character")
    t.add_argument("--model", choices=KINDS, default="scratch")
    t.add_argument("--hidden", type=int, default=None, help="hidden size (default: 512 scratch, 256 otherwise)")
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--bidirectional", action="store_true", help="rnn/gru/lstm only; such a model cannot generate")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--num-steps", type=int, default=35)
    t.add_argument("--lr", type=float, default=1.0)
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    t.add_argument("--epochs", type=int, default=500)
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm threshold theta (0: off)")
    t.add_argument("--sampling", choices=list(SAMPLERS), default="sequential")
    t.add_argument("--max-tokens", type=int, default=10_000, help="training tokens (0: all); the next ones validate")
    t.add_argument("--val-tokens", type=int, default=2_000)
    t.add_argument("--device", choices=DEVICES, default="auto")
    t.add_argument("--seed", type=int, default=0)
    how = t.add_mutually_exclusive_group()
    how.add_argument("--kernel", choices=KERNELS, default="auto",
                     help="how the recurrence runs (auto: the fastest here; reference: the book's loop); "
                          "see charrnn/kernels")
    how.add_argument("--reference", action="store_true", help="the same as --kernel reference")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="step matmuls while training: bf16 (CPU with AMX/AVX512-BF16), fp32, or auto: "
                        "bf16 where it runs, else fp32")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for the run (default 0: one per core)")
    t.add_argument("--probe-every", type=int, default=None, metavar="N",
                   help="measure the gradient flow through time every N epochs (0: never; default: as often "
                        "as costs about 1%% of the training time)")
    t.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a CUDA device, launch each op from Python instead of replaying a recorded graph")
    t.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue a saved run for --epochs more, with its settings, optimizer state, minibatch "
                        "order and history (--lr, --clip, --device, --threads, --precision, --kernel may change; "
                        "a change of lr, clip, precision or kernel ends the match with an uninterrupted run)")
    t.add_argument("--save", metavar="NAME", help="checkpoint name (in checkpoints/) or path; a taken name "
                                                    "is refused unless --overwrite is given")
    t.add_argument("--overwrite", action="store_true", help="let --save replace an existing checkpoint")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    p.train = t                                  # its defaults tell what a user gave (resume_config)
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", default="default", help="checkpoint name or path (default: the shipped model)")
    g.add_argument("--prefix", default="time traveller")
    g.add_argument("--length", type=int, default=50)
    g.add_argument("--temperature", type=float, default=None,
                   help="sample instead of greedy argmax (below 0.001 it samples as 0.001 does)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", choices=DEVICES, default="cpu")
    g.add_argument("--json", action="store_true")

    sub.add_parser("list", help="list the checkpoints in checkpoints/")

    b = sub.add_parser("bench", help="speed and quality: fused against the seed's loop (and the d2l peer)")
    b.add_argument("--models", default="scratch,rnn", help="comma-separated model kinds")
    b.add_argument("--epochs", type=int, default=20)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--peer", default=None, help="path to the d2l_baseline.py harness, to run it alongside")
    b.add_argument("--peer-python", default=None, help="the Python that has d2l installed (default: this one)")
    b.add_argument("--json", action="store_true")
    return p


RESUMABLE = ("epochs", "lr", "clip", "device", "threads", "precision", "kernel", "probe_every")   # --resume may change
NOT_SETTINGS = {"command", "argv", "defaults", "resume", "save", "overwrite", "json", "quiet",
                "corpus"}   # the corpus is checked against the saved SHA-1 instead


def resume_changes(args, parser_defaults: dict) -> dict:
    """The settings --resume changes (those given of RESUMABLE); UserError for any other setting given."""
    given = sorted(k for k, v in vars(args).items()
                   if k not in NOT_SETTINGS | set(RESUMABLE) and v != parser_defaults.get(k))
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise UserError(f"--resume continues the saved run's settings, so {flags} cannot be given; "
                        f"only {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)} may change.")
    return {k: getattr(args, k) for k in RESUMABLE if getattr(args, k) != parser_defaults.get(k)}


def cmd_train(args) -> None:
    if args.resume:
        return cmd_train_from(resume_changes(args, args.defaults), args)
    config = TrainConfig(
        model=args.model, hidden_size=args.hidden, num_layers=args.layers, bidirectional=args.bidirectional,
        batch_size=args.batch_size, num_steps=args.num_steps, lr=args.lr, epochs=args.epochs, clip=args.clip,
        sampling=args.sampling, max_tokens=args.max_tokens, optimizer=args.optimizer, seed=args.seed,
        device=args.device, kernel="reference" if args.reference else args.kernel, precision=args.precision,
        threads=args.threads, cuda_graphs=args.cuda_graphs, probe_every=args.probe_every)
    save_path = save_target(args)
    corpus = load_corpus(args.corpus, args.preprocessing, config.max_tokens, args.val_tokens)
    run_trainer(Trainer(config, corpus), args, save_path)


def save_target(args) -> Path | None:
    """Where --save goes, checked before any training: writable, and not taken unless --overwrite."""
    save_path = resolve(args.save) if args.save else None
    if save_path is not None:
        try:
            check_writable(save_path, overwrite=args.overwrite)
        except CheckpointExists as e:
            fail(taken_message(e.path))
    return save_path


def cmd_train_from(changes: dict, args) -> None:
    """--resume: the saved run's corpus (checked by its SHA-1), weights and state, N more epochs."""
    loaded = load_checkpoint(resolve(args.resume))
    save_path = save_target(args)
    c, saved = loaded.meta["corpus"], loaded.meta.get("train") or {}
    source = "timemachine" if c["name"] == "timemachine" else args.corpus
    if source == "timemachine" and c["name"] != "timemachine":
        raise UserError(f"The saved run trained on {c['name']}: give that text with --corpus PATH.")
    corpus = load_corpus(source, loaded.preprocessing, saved.get("max_tokens", 10_000), c.get("val_tokens", 2_000))
    trainer, notes = continued_trainer(loaded, corpus, **changes)
    if notes:
        print(f"charrnn: {'; '.join(notes)}: the result will not match an uninterrupted run.", file=sys.stderr)
    run_trainer(trainer, args, save_path)


def run_trainer(trainer, args, save_path) -> None:
    config = trainer.config
    command = "python -m charrnn " + shlex.join(args.argv)
    bar = tqdm(total=config.epochs, unit="epoch", file=sys.stderr, disable=args.quiet, dynamic_ncols=True)
    t0, status = time.perf_counter(), 0
    try:
        for stats in trainer.run():
            if stats.epoch == 0:
                continue
            bar.update(1)
            bar.set_postfix(ppl=f"{stats.train_ppl:.3f}", val=f"{stats.val_ppl or float('nan'):.2f}",
                            tok_s=f"{stats.tokens_per_s:,.0f}")
            if stats.sample is not None and not args.json:
                tqdm.write(f"epoch {stats.epoch:>5}  ppl {stats.train_ppl:7.3f}  {stats.sample!r}")
    except TrainingDiverged as e:
        bar.close()
        print(f"charrnn: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        bar.close()
        print(f"charrnn: stopped after epoch {trainer.epoch}.", file=sys.stderr)
        status = 130
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if trainer.graph_failed:
        print(f"charrnn: the CUDA graph could not be recorded, trained op by op ({trainer.graph_failed}).",
              file=sys.stderr)
    saved = None
    if save_path is not None and trainer.epoch > 0:
        saved = save_trained(save_path, trainer, command, args.overwrite)
    last = trainer.last
    result = {
        "model": config.model, "hidden": config.hidden_size, "layers": config.num_layers,
        "epochs": trainer.epoch, "sampling": config.sampling, "device": str(trainer.device),
        "perplexity": round(last.train_ppl, 4) if last else None,
        "val_perplexity": round(last.val_ppl, 4) if last and last.val_ppl else None,
        "tokens_per_s": round(trainer.tokens_per_s), "wall_s": round(wall, 2),
        "sample": last.sample if last and last.sample else trainer.sample(), "kernel": trainer.kernel.name,
        "fused": trainer.kernel.fused, "precision": trainer.precision,
        "cuda_graph": trainer.graphed, "lr": config.lr, "seed": config.seed,
        "checkpoint": str(saved) if saved else None,
    }
    if args.json:   # the baselines the run's perplexity is read against, on the same training tokens
        result["ngram_perplexity"] = {
            str(n): {k: round(v, 4) if v is not None else None for k, v in r.items()}
            for n, r in corpus_ngram_perplexities(trainer.corpus).items()}
    if trainer.precision == "bf16":               # whether its step loops ran in C or in Python, and why
        result["native"] = kernels.bf16.status()
    if trainer.device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**20)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']}, validation {result['val_perplexity']}, "
              f"{result['tokens_per_s']:,} tokens/s on {result['device']} ({result['kernel']}), {wall:.1f} s")
        print(result["sample"])
    if status:
        sys.exit(status)


def taken_message(path) -> str:
    return f"{path} exists already; choose another name or pass --overwrite to replace it."


def save_trained(path: Path, trainer, command: str, overwrite: bool) -> Path:
    """Save the trained model at `path`; if that name was taken while it trained, under
    NAME-YYYYmmdd-HHMMSS (-2, -3, ... if need be) beside it, so that the run is not lost."""
    meta = make_metadata(trainer, command=command)
    try:
        saved = save_checkpoint(path, trainer.model, meta, overwrite=overwrite, optimizer=trainer.resume_state()[0])
        print(f"charrnn: saved {saved} (epoch {trainer.epoch}).", file=sys.stderr)
        return saved
    except CheckpointExists as e:
        taken = e.path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = taken.name[:-len(SUFFIX)]
    for n in itertools.count(1):
        tail = f"-{stamp}" + (f"-{n}" if n > 1 else "")
        try:
            saved = save_checkpoint(taken.with_name(stem[:64 - len(tail)] + tail + SUFFIX), trainer.model, meta,
                                    optimizer=trainer.resume_state()[0])
            break
        except CheckpointExists:
            continue
    print(f"charrnn: {taken} was created while this run trained; saved {saved} instead "
          f"(epoch {trainer.epoch}).", file=sys.stderr)
    return saved


def cmd_generate(args) -> None:
    length = args.length
    if length > MAX_LENGTH:
        print(f"charrnn: length capped at {MAX_LENGTH} characters.", file=sys.stderr)
        length = MAX_LENGTH
    check_sampling(length, args.temperature, args.top_k)
    from .device import resolve_device
    loaded = load_checkpoint(resolve(args.checkpoint), device=resolve_device(args.device))
    out = generate(loaded.model, loaded.vocab, args.prefix, length, preprocessing=loaded.preprocessing,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if out.unknown:
        print(f"charrnn: not in the vocabulary, read as <unk>: {''.join(out.unknown)!r}", file=sys.stderr)
    if args.json:
        print(json.dumps({"prefix": out.prefix, "text": out.text, "continuation": out.continuation,
                          "unknown": out.unknown, "next": out.next_probs, "path": out.path}))
    else:
        print(out.text)


def cmd_list(args) -> None:
    entries = list_checkpoints()
    if not entries:
        print("no checkpoints")
    for e in entries:
        if "error" in e:
            print(f"{e['name']:<24} unreadable: {e['error']}")
        else:
            ppl = f"{e['perplexity']:.3f}" if e["perplexity"] else "-"
            print(f"{e['name']:<24} {e['model']:<8} hidden {e['hidden']:<5} epochs {e['epochs']:<6} "
                  f"ppl {ppl:<8} corpus {e['corpus']}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "train":                  # what the user left alone (--resume refuses the rest)
        args.defaults = {k: parser.train.get_default(k) for k in vars(args)}
    try:
        if args.command == "train":
            cmd_train(args)
        elif args.command == "generate":
            cmd_generate(args)
        elif args.command == "list":
            cmd_list(args)
        elif args.command == "bench":
            from .bench import BenchError, main as bench_main
            try:
                bench_main(args)
            except BenchError as e:     # a child run failed: one sentence that names its log
                fail(str(e), status=1)
    except TrainingDiverged as e:
        fail(str(e), status=1)
    except KeyboardInterrupt:
        print("charrnn: interrupted.", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:    # anything else is a bug: its full traceback, exit status 1
        fail(str(e))


if __name__ == "__main__":
    main()
