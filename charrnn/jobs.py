"""Training jobs in background threads, for the app (or anything that must not block).

    registry = JobRegistry()
    job = registry.start(TrainConfig(epochs=50), corpus)   # refused with JobBusy while one runs
    snap = job.snapshot()                                  # plain data: status, columns, samples
    job.stop()                                             # returns within a second
    job.save(job.default_name)                             # checkpoints/rnn-256-20250101-093000.safetensors
    job.save("my-model", overwrite=True)                   # replaces an existing my-model
    registry.continue_saved(load_checkpoint(path), corpus, epochs=20)   # a saved run, 20 more epochs

The worker thread only appends numbers and strings under a lock and checks a threading.Event
between minibatches; it never touches the UI. Its exceptions are caught and kept as one sentence.
History is kept as float arrays (8 bytes per value), so memory stays small however long a job runs.
"""
from __future__ import annotations

import itertools
import shlex
import threading
import time
from array import array
from dataclasses import dataclass, field, replace

from .errors import UserError
from .checkpoint import Loaded, make_metadata, path_for_name, save_checkpoint
from .data import Corpus
from .gradflow import GradFlow
from .ngram import corpus_ngram_perplexities
from .train import EpochStats, TrainConfig, Trainer, TrainingDiverged

COLUMNS = ("epoch", "train_ppl", "val_ppl", "tokens_per_s", "grad_norm", "grad_norm_max", "clipped", "sigma_max",
           "elapsed_s")
NAN = float("nan")


class JobBusy(RuntimeError):
    """A job is already running; the message says which."""


@dataclass
class Snapshot:
    """A consistent copy of a job's state, safe to use from any thread."""
    id: str
    label: str
    status: str                    # running | finished | stopped | failed
    error: str | None
    epochs: int                    # the epoch the run trains up to (more after a Continue)
    epoch: int                     # full epochs done
    columns: dict[str, list[float]]
    samples: list[tuple[int, str]]  # (epoch, text), oldest first
    flows: list[tuple[int, GradFlow]]  # (epoch, the gradient flow through time on the probe minibatch)
    elapsed_s: float
    config: TrainConfig
    vocab_size: int
    precision: str                 # what the run trains in (config.precision "auto" resolved)
    kernel: str                    # how its recurrence runs (config.kernel "auto" resolved, charrnn/kernels)
    saved: list[str] = field(default_factory=list)
    ngram: dict[int, dict] | None = None  # n-gram baselines on the run's text: {order: {"train", "val"}}
    graph_failed: str | None = None  # why the CUDA graph could not be recorded (the run went on op by op)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def eta_s(self) -> float | None:
        if self.epoch == 0 or not self.running:
            return None
        return self.elapsed_s / self.epoch * (self.epochs - self.epoch)

    def history_csv(self) -> str:
        """The per-epoch history as CSV, one row an epoch (0: the untrained model), empty cells
        where a value does not exist (no validation tokens, no update at epoch 0)."""
        rows = [",".join(COLUMNS)]
        for values in zip(*(self.columns[c] for c in COLUMNS)):
            rows.append(",".join("" if v != v else (str(int(v)) if c == "epoch" else repr(v))
                                 for c, v in zip(COLUMNS, values)))
        return "\n".join(rows) + "\n"

    def last(self, column: str) -> float | None:
        values = [v for v in self.columns[column] if v == v]  # NaN != NaN
        return values[-1] if values else None


class Job:
    _ids = itertools.count(1)

    def __init__(self, config: TrainConfig, corpus: Corpus, label: str | None = None,
                 settings: dict | None = None, trainer: Trainer | None = None):
        # bad settings raise here, in the caller; a given trainer may have trained already (continued_trainer)
        self.trainer = trainer or Trainer(config, corpus)
        self.id = f"run{next(self._ids)}"
        self.label = label or default_label(config, corpus, self.id)
        self.config, self.corpus, self.settings = config, corpus, settings
        self.status, self.error = "running", None
        self.columns = {c: array("d") for c in COLUMNS}
        done = self.trainer.history                          # a continued run's curve goes on from its past:
        if len(done["epoch"]):                               # epochs 1.. (epoch 0, untrained, is not kept)
            for c in COLUMNS:
                self.columns[c].append(0.0 if c == "epoch" else NAN)
                self.columns[c].extend(done[c] if c in done else [NAN] * len(done["epoch"]))
        self.samples: list[tuple[int, str]] = []
        self.saved: list[str] = []
        self.ngram: dict[int, dict] | None = None
        self._counted = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.perf_counter() - self.trainer.train_seconds
        self.started_at = time.localtime()                 # wall clock, for names that outlive the process
        self._ended: float | None = None
        self._target = self.trainer.epoch + config.epochs  # the epoch this run trains up to
        self._thread = threading.Thread(target=self._work, name=f"charrnn-{self.id}", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _continue(self, epochs: int) -> "Job":
        """Train `epochs` more epochs in a new worker thread (JobRegistry.resume checks that no
        run trains meanwhile); the history, the chart's curve and the saved run continue."""
        if self.running or self._thread.is_alive():
            raise JobBusy(f"{self.label} is still training.")
        config = replace(self.config, epochs=epochs)    # validated like any setting
        with self._lock:
            self.trainer.config = self.config = config
            self._target = self.trainer.epoch + epochs
            if self._ended is not None:                # the time between the runs is not training
                self._started += time.perf_counter() - self._ended
            self.status, self.error, self._ended = "running", None, None
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._work, name=f"charrnn-{self.id}", daemon=True)
        return self.start()

    def _record(self, stats: EpochStats) -> None:
        with self._lock:
            for c in COLUMNS:
                v = getattr(stats, c)
                self.columns[c].append(NAN if v is None else float(v))
            if stats.sample is not None:
                self.samples.append((stats.epoch, stats.sample))

    def _work(self) -> None:
        try:
            for stats in self.trainer.run(self._stop):
                self._record(stats)
                if not self._counted:    # after the first point, so the chart does not wait for it
                    ngram = baselines(self.corpus)
                    with self._lock:
                        self.ngram, self._counted = ngram, True
            status, error = ("stopped" if self._stop.is_set() else "finished"), None
        except TrainingDiverged as e:
            status, error = "failed", str(e)
        except Exception as e:  # anything else still reaches the page as one sentence
            status, error = "failed", f"Training stopped with an error: {type(e).__name__}: {e}"
        with self._lock:
            self.status, self.error, self._ended = status, error, time.perf_counter()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop after the current minibatch and wait for it."""
        self._stop.set()
        self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The worker thread exists (it may be a moment past its last update)."""
        return self._thread.is_alive()

    @property
    def running(self) -> bool:
        """Still training. Turns False with the final status, which is all a page should wait
        for: the thread may take a moment more to exit, but it touches nothing after that."""
        with self._lock:
            return self.status == "running"

    def snapshot(self) -> Snapshot:
        with self._lock:
            end = self._ended or time.perf_counter()
            return Snapshot(
                id=self.id, label=self.label, status=self.status, error=self.error,
                epochs=self._target, epoch=self.trainer.epoch,
                columns={c: list(a) for c, a in self.columns.items()}, samples=list(self.samples),
                flows=list(self.trainer.flows),   # appended by the worker before its epoch's stats (atomic)
                elapsed_s=end - self._started, config=self.config, vocab_size=len(self.corpus.vocab),
                precision=self.trainer.precision, kernel=self.trainer.kernel.name, saved=list(self.saved),
                ngram=self.ngram, graph_failed=self.trainer.graph_failed)

    @property
    def default_name(self) -> str:
        """MODEL-HIDDEN-YYYYmmdd-HHMMSS, from when the job started: unlike the job id (run1, run2,
        ... again after every restart of the server) it does not repeat an earlier run's name."""
        return f"{self.config.model}-{self.config.hidden_size}-{time.strftime('%Y%m%d-%H%M%S', self.started_at)}"

    def save(self, name: str, overwrite: bool = False) -> str:
        """Save the model as checkpoints/NAME.safetensors; only once the job has ended. A taken
        name raises CheckpointExists (the file is left as it was) unless `overwrite`."""
        if self.running:
            raise JobBusy("Stop the run before saving it.")
        if self.trainer.epoch == 0:
            raise UserError("This run has not finished an epoch yet: there is nothing to save.")
        meta = make_metadata(self.trainer, command=self.cli_command(), settings=self.settings)
        path = save_checkpoint(path_for_name(name), self.trainer.model, meta, overwrite=overwrite,
                               optimizer=self.trainer.resume_state()[0])
        with self._lock:
            self.saved.append(str(path))
        return str(path)

    def cli_command(self) -> str:
        """The command line that trains the same model headless."""
        val = 0 if self.corpus.val is None else len(self.corpus.val)
        return cli_command(self.config, self.corpus.name, self.corpus.preprocessing, val)


def cli_command(c: TrainConfig, corpus: str = "timemachine", preprocessing: str = "seed", val: int = 2_000) -> str:
    """The command line that trains with these settings headless."""
    args = ["--corpus", corpus, "--preprocessing", preprocessing, "--model", c.model,
            "--hidden", c.hidden_size, "--layers", c.num_layers] + (["--bidirectional"] if c.bidirectional else []) + [
            "--batch-size", c.batch_size, "--num-steps", c.num_steps, "--lr", repr(c.lr), "--optimizer", c.optimizer,
            "--epochs", c.epochs, "--clip", repr(c.clip), "--sampling", c.sampling, "--max-tokens", c.max_tokens,
            "--val-tokens", val, "--seed", c.seed, "--device", c.device, "--precision", c.precision,
            "--kernel", c.kernel, "--threads", c.threads]
    if not c.cuda_graphs:
        args.append("--no-cuda-graphs")
    if c.probe_every is not None:
        args += ["--probe-every", str(c.probe_every)]
    return "python -m charrnn train " + shlex.join(str(a) for a in args)


_baselines: dict[tuple, dict[int, dict]] = {}
# Counting runs in Python in the worker's thread: past a few million tokens (a large upload trained
# whole) it would hold up the run and the server for minutes, so such runs go without baselines.
MAX_NGRAM_TOKENS = 2_000_000


def corpus_key(corpus: Corpus) -> tuple:
    """What names a corpus's training and validation split: the text, its preprocessing, the sizes."""
    return corpus.sha1, corpus.preprocessing, len(corpus.train), 0 if corpus.val is None else len(corpus.val)


def baselines(corpus: Corpus) -> dict[int, dict] | None:
    """The n-gram baselines of a corpus's training and validation tokens, computed once per text
    and split (runs on the same text share them; a few entries, each a few numbers); None for a
    training slice above MAX_NGRAM_TOKENS."""
    if len(corpus.train) > MAX_NGRAM_TOKENS:
        return None
    key = corpus_key(corpus)
    if key not in _baselines:
        _baselines[key] = corpus_ngram_perplexities(corpus)
    return _baselines[key]


def continued_trainer(loaded: Loaded, corpus: Corpus, **changes) -> tuple[Trainer, list[str]]:
    """A Trainer that goes on with the run a checkpoint saved, exactly where it ended (weights,
    optimizer, minibatch order, history), for `changes["epochs"]` more epochs, and what differs from
    the saved run. `corpus` must be the text it trained on (checked by SHA-1). `changes` may set
    what does not change the numbers' meaning (epochs, lr, clip, device, threads, precision, kernel);
    a saved kernel this machine lacks is replaced by this machine's choice, and the notes say so."""
    saved = loaded.meta.get("train")
    if not isinstance(saved, dict):
        raise UserError(f"{loaded.path.name} has no training settings to continue.")
    c = loaded.meta["corpus"]
    if corpus.sha1 != c["sha1"]:
        raise UserError(f"{corpus.name} is not the text {loaded.path.stem} trained on ({c['name']}; "
                        f"SHA-1 {corpus.sha1[:12]}…, not {c['sha1'][:12]}…).")
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields} | changes)
    notes = [f"{k} differs from the saved run's" for k in ("lr", "clip", "precision", "kernel")
             if k in changes and changes[k] != saved.get(k)]
    try:
        trainer = Trainer(config, corpus, model=loaded.model)
    except UserError as e:
        if "kernel" in changes or "precision" in changes or config.kernel == "auto":
            raise
        trainer = Trainer(replace(config, kernel="auto", precision="auto"), corpus, model=loaded.model)
        notes.append(f"its kernel {config.kernel} cannot run here ({e}), so it trains with {trainer.kernel.name}")
    trainer.resume(loaded.meta, loaded.optimizer)
    return trainer, notes


def default_label(config: TrainConfig, corpus: Corpus, job_id: str) -> str:
    text = "" if corpus.name == "timemachine" else f" · {corpus.name}"
    return f"{job_id} · {config.model}-{config.hidden_size} · {config.sampling}{text}"


class JobRegistry:
    """Every job of the process. One runs at a time: a second start is refused, not queued."""

    def __init__(self, keep: int = 10):
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, config: TrainConfig, corpus: Corpus, label: str | None = None,
              settings: dict | None = None) -> Job:
        with self._lock:
            running = self._running()
            if running is not None:
                snap = running.snapshot()
                raise JobBusy(f"A run is already training ({snap.label}, epoch {snap.epoch} of "
                              f"{snap.epochs}); stop it first.")
            job = Job(config, corpus, label, settings)
            self._add(job)
            return job.start()

    def resume(self, job_id: str, epochs: int) -> Job:
        """Continue an ended run for `epochs` more epochs; refused with JobBusy while any run trains."""
        with self._lock:
            running = self._running()
            if running is not None:
                raise JobBusy(f"A run is already training ({running.snapshot().label}); stop it first.")
            job = self._jobs.get(job_id)
            if job is None:
                raise UserError("That run is no longer kept here; load its checkpoint instead.")
            return job._continue(epochs)

    def continue_saved(self, loaded: Loaded, corpus: Corpus, epochs: int, **changes) -> tuple[Job, list[str]]:
        """Start a new job that continues a saved checkpoint (continued_trainer) for `epochs` more
        epochs; its curve starts with the saved history. Returns it and continued_trainer's notes."""
        with self._lock:
            running = self._running()
            if running is not None:
                raise JobBusy(f"A run is already training ({running.snapshot().label}); stop it first.")
        trainer, notes = continued_trainer(loaded, corpus, epochs=epochs, **changes)
        label = f"{loaded.path.stem} (continued)"
        with self._lock:
            if self._running() is not None:          # started by another tab while the model loaded
                raise JobBusy("A run started meanwhile; stop it first.")
            job = Job(trainer.config, corpus, label, loaded.meta.get("settings"), trainer=trainer)
            self._add(job)
            return job.start(), notes

    def _add(self, job: Job) -> None:
        self._jobs[job.id] = job
        ended = [j for j in self._jobs.values() if not j.running and j is not job]
        for old in ended[:max(0, len(self._jobs) - self.keep)]:  # forget the oldest ended runs
            del self._jobs[old.id]

    def _running(self) -> Job | None:
        return next((j for j in self._jobs.values() if j.running), None)

    def running(self) -> Job | None:
        with self._lock:
            return self._running()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def remove(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and not job.running:
                del self._jobs[job_id]

    def stop_all(self, timeout: float = 5.0) -> None:
        for job in self.jobs():
            job.stop(timeout)
