"""Training: the seed's train_ch8 as a stream of per-epoch metrics.

    trainer = Trainer(TrainConfig(model="scratch", epochs=500), corpus)
    for stats in trainer.run(stop_event):      # EpochStats per epoch; epoch 0 = the untrained model
        print(stats.epoch, stats.train_ppl)

Besides the perplexities, every epoch reports sigma_max of W_hh and, at some epochs (probe_every),
the gradient flow through time on a fixed probe minibatch (charrnn/gradflow.py).

The loop never prints or plots; the CLI's progress bar and the app's charts subscribe to it.
"""
from __future__ import annotations

import copy
import functools
import math
import random
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import UserError
from . import kernels
from .data import SAMPLERS, Corpus, check_batchable
from .device import resolve_device
from .generate import generate
from .gradflow import GradFlow, gradient_flow, largest_singular_value, probe_batch
from .models import DEFAULT_HIDDEN, ModelConfig, build_model, detach_state

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
PRECISIONS = kernels.PRECISIONS
KERNELS = ("auto",) + kernels.NAMES
MAX_EPOCHS = 100_000
MAX_THREADS = 1024
NAN = float("nan")
MAX_LOSS = 100.0  # mean cross-entropy above this (perplexity e^100) counts as diverged
# probe_every=None probes when the training time since the last probe is at least 1/PROBE_SHARE
# times the last probe's own time. A probe runs the plain autograd loop, so against an epoch of the
# fast kernels its cost differs by model, size and machine: a fixed cadence would be too dense for
# one and too sparse for another (bench/gradflow_cost.py measures what it costs)
PROBE_SHARE = 0.01


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the model holds the weights of the last good epoch."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, with the seed's defaults. `hidden_size=None`: the seed's size
    for the model (512 scratch, 256 concise)."""
    model: str = "scratch"
    hidden_size: int | None = None
    num_layers: int = 1
    bidirectional: bool = False
    batch_size: int = 32
    num_steps: int = 35
    lr: float = 1.0
    epochs: int = 500
    clip: float = 1.0          # gradient-norm threshold theta; 0 turns clipping off
    sampling: str = "sequential"
    max_tokens: int = 10_000
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "auto"
    kernel: str = "auto"       # how the recurrence runs (charrnn/kernels): auto picks the fastest here
    precision: str = "auto"    # step matmuls while training: fp32, bf16 (CPU), or auto (the kernel's)
    threads: int = 0           # CPU threads for the run's ops (0: PyTorch's default, one per core)
    cuda_graphs: bool = True   # on a CUDA device, replay each minibatch's step as one recorded CUDA graph
    sample_every: int = 10
    sample_prefix: str = "time traveller"
    probe_every: int | None = None  # epochs between gradient-flow probes; 0 off; None: by time (PROBE_SHARE)

    def __post_init__(self):
        if self.hidden_size is None:
            object.__setattr__(self, "hidden_size", DEFAULT_HIDDEN.get(self.model, 256))
        checks = [
            (1 <= self.epochs <= MAX_EPOCHS, f"Epochs must be between 1 and {MAX_EPOCHS}, not {self.epochs}."),
            (self.batch_size >= 1, f"Batch size must be at least 1, not {self.batch_size}."),
            (self.num_steps >= 1, f"Steps must be at least 1, not {self.num_steps}."),
            (math.isfinite(self.lr) and self.lr > 0, f"Learning rate must be a positive number, not {self.lr}."),
            (math.isfinite(self.clip) and self.clip >= 0, f"Clipping threshold must be 0 (off) or more, not {self.clip}."),
            (self.sampling in SAMPLERS, f"Sampling must be random or sequential, not {self.sampling!r}."),
            (self.optimizer in OPTIMIZERS, f"Optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}."),
            (self.sample_every >= 1, "Samples must come at least every epoch (sample_every >= 1)."),
            (self.precision in PRECISIONS, f"Precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}."),
            (self.kernel in KERNELS, f"Kernel must be one of {', '.join(KERNELS)}, not {self.kernel!r}."),
            (0 <= self.threads <= MAX_THREADS, f"Threads must be between 0 (all cores) and {MAX_THREADS}, not {self.threads}."),
            (self.probe_every is None or (type(self.probe_every) is int and self.probe_every >= 0),
             f"Gradient probes come every N >= 1 epochs, or never with 0, not {self.probe_every!r}."),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(kind=self.model, vocab_size=vocab_size, hidden_size=self.hidden_size,
                           num_layers=self.num_layers, bidirectional=self.bidirectional)


@dataclass
class EpochStats:
    epoch: int                       # 0: the untrained model, before any update
    train_ppl: float | None          # exp(mean training loss over the epoch)
    val_ppl: float | None            # on the held-out tokens after the training slice
    tokens_per_s: float | None       # training tokens / time in the training loop of this epoch
    grad_norm: float | None          # mean global gradient norm before clipping
    grad_norm_max: float | None
    clipped: float | None            # fraction of minibatches whose gradient was clipped
    elapsed_s: float                 # since the run started
    sample: str | None = None        # 50 characters after sample_prefix, every sample_every epochs
    sigma_max: float | None = None   # largest singular value of W_hh (charrnn/gradflow.py)
    grad_flow: GradFlow | None = None  # at the probe epochs: ||dl_T/dh_t||, ||dl_T/dx_t|| per step t


@functools.cache
def preload_optimizers() -> None:
    """Have torch import what its first optimizer needs, ahead of the first run.

    The first torch.optim optimizer made in a process imports torch._dynamo, a second or two of CPU.
    The app calls this once the Train page is drawn, while it is read, so that Start need not wait."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)


def clip_gradients(parameters, theta: float) -> torch.Tensor:
    """The seed's grad_clipping: g <- g * theta / ||g|| when the global norm ||g|| exceeds theta.

    Returns the norm before clipping. Runs without a host sync (the scale is min(1, theta/||g||)
    as a tensor), so the GPU is never stalled. theta = 0 measures without clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one op per tensor list
    if theta > 0:
        torch._foreach_mul_(grads, (theta / norm).clamp(max=1.0))
    return norm


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, batch_size: int, device) -> float | None:
    """exp(mean cross-entropy) of next-token prediction over `tokens`, read as `batch_size`
    rows from a zero state. None when there are too few tokens."""
    rows = max(1, min(batch_size, (len(tokens) - 1) // 2))
    n = (len(tokens) - 1) // rows * rows
    if n == 0:
        return None
    X = tokens[:n].reshape(rows, -1).to(device)          # (rows, L)
    Y = tokens[1:n + 1].reshape(rows, -1).to(device)     # (rows, L)
    was_training = model.training
    model.eval()
    Y_hat, _ = model(X, model.begin_state(rows, device))  # (L*rows, vocab)
    model.train(was_training)
    return safe_exp(F.cross_entropy(Y_hat.float(), Y.T.reshape(-1)).item())


def safe_exp(loss: float) -> float:
    """exp(mean loss) as a perplexity; inf rather than OverflowError for an absurd loss."""
    return math.exp(loss) if loss < 700 else float("inf")


class CudaGraphStep:
    """The minibatch step on a CUDA device, recorded once as a CUDA graph and replayed.

    At the seed's sizes a minibatch is ~200 small kernels (35 steps forward and back, the head, the
    loss, clipping), each a few microseconds of GPU time, and launching them one by one from
    Python takes longer than running them. A graph replay launches the whole recorded sequence at
    once. The first WARMUP minibatches run op by op (on a side stream, as capture needs: libraries
    set themselves up on first use), the next is recorded on static copies of the minibatch and
    the state, and every later one copies its data in and replays. The optimizer's update runs op
    by op after each replay (one fused kernel for SGD), so every optimizer works unchanged. The
    numbers are the same as op by op; only the launching differs. If recording fails, the run
    goes on op by op (`failed` says why). `release()` frees the graph's memory when a run ends; a
    run continued later records again.
    """
    WARMUP = 3

    def __init__(self, trainer: "Trainer"):
        self.trainer, self.calls = trainer, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.recorded = False                   # whether a graph was recorded (and replayed) in this run
        self.failed: str | None = None
        self.side = torch.cuda.Stream(trainer.device)

    def __call__(self, X, y, state):
        """One minibatch (every one of a run has the same shape): (loss, norm, new state). The
        state returned after a replay is the graph's own buffer, which the next replay overwrites."""
        trainer = self.trainer
        if self.failed:
            return trainer.eager_step(X, y, state)
        self.calls += 1
        if self.calls <= self.WARMUP:
            return self._warm_up(X, y, state)
        if self.graph is None:
            stream = torch.cuda.current_stream(trainer.device)
            try:
                self._record(X, y, state)
            except RuntimeError as e:           # an op that cannot be recorded: carry on op by op
                # a failed capture can leave the capture stream current: go back to this thread's own
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize(trainer.device)
                self.release()
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return trainer.eager_step(X, y, state)
        self.X.copy_(X)
        self.y.copy_(y)
        copy_state(self.state, state)
        self.graph.replay()
        trainer.optimizer.step()
        return self.loss.clone(), self.norm.clone(), self.state  # copies: the next replay overwrites them

    def _warm_up(self, X, y, state):
        device = self.trainer.device
        torch.cuda.synchronize(device)
        with torch.cuda.stream(self.side):
            out = self.trainer.eager_step(X, y, state)
        torch.cuda.synchronize(device)
        return out

    def _record(self, X, y, state):
        trainer = self.trainer
        self.X, self.y, self.state = X.clone(), y.clone(), clone_state(state)
        trainer.optimizer.zero_grad(set_to_none=True)  # backward then allocates them in the graph's pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the app (a page generating text on the GPU) may go on meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.loss, self.norm, new_state = trainer.minibatch(self.X, self.y, self.state)
            copy_state(self.state, new_state)         # the next minibatch starts from it
        self.graph, self.recorded = graph, True

    def release(self) -> None:
        """Free the graph and its memory (the gradients live there too); the next call warms up
        and records again."""
        self.graph = self.X = self.y = self.state = self.loss = self.norm = None
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.calls = 0


def clone_state(state):
    return tuple(s.clone() for s in state) if isinstance(state, tuple) else state.clone()


def copy_state(dst, src) -> None:
    """dst <- src, for a state that is a tensor or a tuple of them."""
    pairs = zip(dst, src) if isinstance(dst, tuple) else [(dst, src)]
    for d, s in pairs:
        if d.data_ptr() != s.data_ptr():
            d.copy_(s)


class Trainer:
    """One training run: the model, its optimizer and the seed's epoch loop."""

    def __init__(self, config: TrainConfig, corpus: Corpus, model=None):
        check_batchable(len(corpus.train), config.batch_size, config.num_steps)
        self.config, self.corpus = config, corpus
        self.device = resolve_device(config.device)
        if model is None:
            model = build_model(config.model_config(len(corpus.vocab)), seed=config.seed, kernel="reference")
        self.model = model.to(self.device)
        self.kernel = kernels.select(model.config, self.device, config.precision, config.kernel)
        self.model.kernel = self.kernel
        self.optimizer = OPTIMIZERS[config.optimizer](self.model.parameters(), lr=config.lr)
        self.graph_step = CudaGraphStep(self) if self.device.type == "cuda" and config.cuda_graphs else None
        self.step = self.graph_step or self.eager_step
        self.rng = random.Random(config.seed)     # the iterators' offsets and shuffles
        self.epoch = 0                            # full epochs trained
        self.train_tokens, self.train_seconds = 0, 0.0
        self.history = {c: array("d") for c in ("epoch", "train_ppl", "val_ppl", "sigma_max")}  # 8 bytes a value
        self.flows: list[tuple[int, GradFlow]] = []   # (epoch, its probe) at every epoch probed, 0 included
        self.first: EpochStats | None = None      # epoch 0, the untrained model
        self.last: EpochStats | None = None       # the latest full epoch
        self.sigma_bases: dict = {}               # largest_singular_value's vectors, from epoch to epoch
        self.probe_s, self.probed_at = 0.0, 0.0   # the last probe's time; train_seconds when it ran

    def _epoch_start(self) -> tuple:
        """What an epoch changes, as it was before it: the weights, the optimizer's state and the
        minibatch order's random state (a stopped epoch is undone whole, so it can be continued)."""
        return ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                copy.deepcopy(self.optimizer.state_dict()), self.rng.getstate())

    def _back_to(self, start: tuple) -> None:
        weights, optimizer, rng = start
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer)
        self.rng.setstate(rng)

    def resume_state(self) -> tuple[dict, dict]:
        """What continuing this run later needs besides the weights and the history: (the
        optimizer's tensors by name, plain JSON data: the counters, the minibatch order's random
        state, the optimizer's other state)."""
        state = self.optimizer.state_dict()
        tensors, numbers = {}, {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{name}"] = value
                else:
                    numbers[f"{index}.{name}"] = value
        version, internal, gauss = self.rng.getstate()
        return tensors, {"epoch": self.epoch, "train_tokens": self.train_tokens, "train_seconds": self.train_seconds,
                         "rng": [version, list(internal), gauss], "optimizer": self.config.optimizer,
                         "optimizer_numbers": numbers}

    def resume(self, meta: dict, optimizer_tensors: dict) -> None:
        """Continue the run a checkpoint saved (its metadata and optimizer tensors; the weights are
        the model's already): its epoch count, history, minibatch order and optimizer state, so that
        the next epochs are the ones an uninterrupted run would have trained."""
        saved = meta.get("resume")
        if not isinstance(saved, dict) or saved.get("optimizer") != self.config.optimizer:
            raise UserError("This checkpoint cannot be continued: it has no optimizer state for "
                            f"{self.config.optimizer} (it was saved by an older charrnn, or another optimizer).")
        self.epoch = int(saved["epoch"])
        self.train_tokens, self.train_seconds = saved["train_tokens"], float(saved["train_seconds"])
        version, internal, gauss = saved["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        history = meta.get("history") or {}
        epochs = len(history.get("epoch", []))
        for column, values in self.history.items():   # a column an older charrnn did not save: NaN
            saved_values = history.get(column) or [None] * epochs
            values.extend(NAN if v is None else v for v in saved_values)
        flows = meta.get("gradflow") or {}
        self.flows = [(int(e), GradFlow(h, x, loss)) for e, h, x, loss in
                      zip(flows.get("epoch", []), flows.get("h", []), flows.get("x", []), flows.get("loss", []))]
        state = {}
        for key, value in list(optimizer_tensors.items()) + list(saved.get("optimizer_numbers", {}).items()):
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value   # load_state_dict puts each on its parameter's device
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})

    @property
    def precision(self) -> str:
        """What the step matmuls train in: the kernel's."""
        return self.kernel.precision

    def eager_step(self, X, y, state):
        """One minibatch, op by op: `minibatch` and the update. Returns (loss, norm, new state)."""
        out = self.minibatch(X, y, state)
        self.optimizer.step()
        return out

    @property
    def graphed(self) -> bool:
        """Whether the minibatches replay a recorded CUDA graph (after the first few)."""
        return self.graph_step is not None and self.graph_step.recorded

    @property
    def graph_failed(self) -> str | None:
        """Why recording the CUDA graph failed, if it did (the run then went on op by op)."""
        return self.graph_step and self.graph_step.failed

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0

    def sample(self) -> str | None:
        if not self.model.config.can_generate:
            return None
        return generate(self.model, self.corpus.vocab, self.config.sample_prefix, 50,
                        device=self.device, preprocessing=self.corpus.preprocessing).text

    def val_perplexity(self) -> float | None:
        if self.corpus.val is None:
            return None
        return perplexity(self.model, self.corpus.val, self.config.batch_size, self.device)

    def measure(self, forced: bool = False) -> tuple[float, GradFlow | None]:
        """(sigma_max of W_hh, the gradient flow on the probe minibatch if one is due now, also kept
        in self.flows): after an epoch's training, outside its tokens_per_s. `forced`: probe whatever the cadence (a run's
        first and last epochs, so every run has rows to draw). Neither touches the weights, their
        gradients or any random state, so a run trains the same with or without probes."""
        sigma = largest_singular_value(self.model, self.sigma_bases)
        every = self.config.probe_every
        if every == 0 or self.model.config.bidirectional:       # bidirectional: no h_t of the past alone
            return sigma, None
        due = forced or (self.epoch % every == 0 if every else
                         self.train_seconds - self.probed_at >= self.probe_s / PROBE_SHARE)
        if not due:
            return sigma, None
        t0 = time.perf_counter()
        X, Y = probe_batch(self.corpus.train, self.config.batch_size, self.config.num_steps)
        flow = gradient_flow(self.model, X, Y)
        # the last probe's time, not the quickest: on a busy machine a probe costs more, and the
        # next one waits the longer for it, so the share of the time holds there too
        self.probe_s, self.probed_at = time.perf_counter() - t0, self.train_seconds
        self.flows.append((self.epoch, flow))
        return sigma, flow

    def train_epoch(self, stop: threading.Event | None = None):
        """One pass over the training tokens; returns (loss_sum, tokens, grad norms) or None if stopped.

        State rules of the seed: random sampling starts every minibatch from a zero state;
        sequential partitioning carries the state on, detached so gradients stop at the boundary.
        The epoch's minibatches go to the device in one copy; the loss and the norms stay there
        until the epoch ends, so a GPU is never waited for between minibatches.
        """
        cfg, model = self.config, self.model
        model.train()                             # the kernel's training mode (bf16 where it is)
        batches = list(SAMPLERS[cfg.sampling](self.corpus.train, cfg.batch_size, cfg.num_steps, self.rng))
        Xs = torch.stack([X for X, _ in batches]).to(self.device)            # (n, batch, steps)
        ys = torch.stack([Y.T.reshape(-1) for _, Y in batches]).to(self.device)  # (n, steps*batch), step-major like Y_hat
        state, loss_sum, tokens, norms = None, torch.zeros((), device=self.device), 0, []
        for X, y in zip(Xs, ys):
            if stop is not None and stop.is_set():
                return None
            if state is None or cfg.sampling == "random":
                state = model.begin_state(X.shape[0], self.device)
            loss, norm, state = self.step(X, y, state)
            norms.append(norm)
            loss_sum += loss * y.numel()
            tokens += y.numel()
        return loss_sum.item(), tokens, torch.stack(norms)

    def minibatch(self, X, y, state):
        """Forward, backward and clipping of one minibatch (the update is `optimizer.step()`).
        Returns the loss, the gradient norm before clipping and the new state, all detached."""
        y_hat, state = self.model(X, state)           # (steps*batch, vocab)
        loss = F.cross_entropy(y_hat, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(self.model.parameters(), self.config.clip)
        return loss.detach(), norm, detach_state(state)

    def run(self, stop: threading.Event | None = None) -> Iterator[EpochStats]:
        """Train `config.epochs` epochs (more if called again), yielding EpochStats for each.

        Yields epoch 0 (the untrained model) on a fresh trainer. Returns early, without an event,
        when `stop` is set; raises TrainingDiverged (weights restored to the last good epoch)
        when the loss stops being finite. `config.threads` applies to the thread that iterates
        it, so iterate it on one thread (a job's worker, the CLI's main thread).
        """
        try:
            with kernels.run_threads(self.kernel, self.config.threads):   # the app's other threads keep theirs
                yield from self._run(stop)
        finally:
            if self.graph_step is not None:  # a finished job would keep the graph's memory
                self.graph_step.release()

    def _run(self, stop: threading.Event | None) -> Iterator[EpochStats]:
        cfg, t_start = self.config, time.perf_counter()
        if self.epoch == 0:
            sigma, flow = self.measure(forced=True)
            stats = EpochStats(0, None, self.val_perplexity(), None, None, None, None, 0.0, self.sample(),
                               sigma_max=sigma, grad_flow=flow)
            self.first = stats
            yield stats
        first_epoch, last_epoch = self.epoch + 1, self.epoch + cfg.epochs
        while self.epoch < last_epoch:
            good = self._epoch_start()
            t0 = time.perf_counter()
            try:
                result = self.train_epoch(stop)
            except KeyboardInterrupt:              # Ctrl-C in the CLI: the same as a stop
                self._back_to(good)
                raise
            if result is None:                     # stopped mid-epoch: back to the last full epoch,
                self._back_to(good)                # so the weights match what the history says
                return
            loss_sum, tokens, norms = result
            seconds = time.perf_counter() - t0
            mean_loss = loss_sum / tokens
            if not (mean_loss < MAX_LOSS and bool(torch.isfinite(norms).all())):  # NaN fails `<` too
                self._back_to(good)
                raise TrainingDiverged(
                    f"Training diverged in epoch {self.epoch + 1} (the loss became NaN or exploded); "
                    f"the model keeps the weights of epoch {self.epoch}. Try a lower learning rate "
                    f"than {cfg.lr:g} or a clipping threshold.")
            self.epoch += 1
            self.train_tokens += tokens
            self.train_seconds += seconds
            norms = norms.float()
            sigma, flow = self.measure(forced=self.epoch in (first_epoch, last_epoch))
            stats = EpochStats(
                epoch=self.epoch, train_ppl=safe_exp(mean_loss), val_ppl=self.val_perplexity(),
                tokens_per_s=tokens / seconds, grad_norm=float(norms.mean()), grad_norm_max=float(norms.max()),
                clipped=float((norms > cfg.clip).float().mean()) if cfg.clip > 0 else 0.0,
                elapsed_s=time.perf_counter() - t_start,
                sample=self.sample() if self.epoch % cfg.sample_every == 0 or self.epoch == last_epoch else None,
                sigma_max=sigma, grad_flow=flow)
            self.last = stats
            for c in self.history:
                v = getattr(stats, c)
                self.history[c].append(NAN if v is None else v)
            yield stats
