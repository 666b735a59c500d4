"""Checkpoints: one .safetensors file per model, weights plus JSON metadata in its header.

The metadata says everything needed to use and reproduce the model: its config, the vocabulary
(index -> token), the preprocessing, the corpus (name, SHA-1), the training settings and the
command, the final metrics and the per-epoch history. Files are written to a temporary file and
renamed, so a crash mid-save leaves the previous file whole. A save never replaces an existing
file unless asked to (overwrite=True): the refusal is atomic, so two saves racing for one name
cannot both win. Nothing is ever unpickled.

    python -m charrnn list                    # the checkpoints in checkpoints/
"""
from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
from torch import nn

from . import __version__
from .data import Vocab
from .errors import UserError
from .models import ModelConfig, build_model

FORMAT, FORMAT_VERSION = "charrnn-checkpoint", 1
SUFFIX = ".safetensors"
OPTIMIZER = "optimizer."     # the prefix of the optimizer's tensors beside the weights (Trainer.resume_state)
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # CHARRNN_CHECKPOINTS overrides
DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class CheckpointError(UserError):
    """A checkpoint could not be read or written; the message is one sentence for the user."""


class CheckpointExists(CheckpointError):
    """The name is taken and replacing it was not asked for; `path` is the existing file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        super().__init__(f"{self.path} exists already; choose another name or ask to overwrite it.")


@dataclass
class Loaded:
    model: nn.Module
    vocab: Vocab
    meta: dict
    path: Path
    optimizer: dict = field(default_factory=dict)   # the optimizer's tensors, to continue the run

    @property
    def preprocessing(self) -> str:
        return self.meta.get("preprocessing", "seed")


def checkpoint_dir() -> Path:
    return Path(os.environ.get("CHARRNN_CHECKPOINTS", CHECKPOINT_DIR))


def path_for_name(name: str, folder: Path | None = None) -> Path:
    """checkpoints/NAME.safetensors for a plain name; names that could leave the folder are refused."""
    name = name.strip()
    if name.endswith(SUFFIX):
        name = name[:-len(SUFFIX)]
    if not _NAME.match(name) or ".." in name:
        raise CheckpointError(f"{name!r} is not a usable checkpoint name: use up to 64 letters, digits, "
                              f"'-', '_' or '.', starting with a letter or digit.")
    return (folder or checkpoint_dir()) / (name + SUFFIX)


def resolve(name_or_path: str) -> Path:
    """A CLI argument: a path (it has a '/', or names an existing file) or a name in the
    checkpoints folder (with or without the .safetensors suffix)."""
    if "/" in name_or_path or os.sep in name_or_path or Path(name_or_path).is_file():
        return Path(name_or_path)
    return path_for_name(name_or_path)


def make_metadata(trainer, command: str | None = None, settings: dict | None = None) -> dict:
    """The JSON metadata of a trained model, from a charrnn.train.Trainer."""
    corpus, h, last, first = trainer.corpus, trainer.history, trainer.last, trainer.first
    nan_to_none = lambda xs: [None if x != x else x for x in xs]  # JSON has no NaN
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "charrnn_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": asdict(trainer.model.config),
        "vocab": corpus.vocab.idx_to_token,
        "preprocessing": corpus.preprocessing,
        "corpus": {"name": corpus.name, "sha1": corpus.sha1, "train_tokens": len(corpus.train),
                   "val_tokens": 0 if corpus.val is None else len(corpus.val)},
        "train": asdict(trainer.config) | {"device": str(trainer.device), "precision": trainer.precision,
                                           "kernel": trainer.kernel.name},
        "command": command, "settings": settings,
        "metrics": {"epochs": trainer.epoch,
                    "perplexity": last.train_ppl if last else None,
                    "val_perplexity": last.val_ppl if last else (first.val_ppl if first else None),
                    "tokens_per_s": trainer.tokens_per_s or None},
        "history": {"epoch": [int(e) for e in h["epoch"]], "train_ppl": nan_to_none(h["train_ppl"]),
                    "val_ppl": nan_to_none(h["val_ppl"]), "sigma_max": nan_to_none(h["sigma_max"])},
        # the gradient flow through time at the epochs probed (charrnn/gradflow.py), for Inspect;
        # 4 significant digits: a picture's worth, and the header stays small
        "gradflow": {"epoch": [e for e, _ in trainer.flows],
                     "h": [[float(f"{v:.4g}") for v in f.h_norms] for _, f in trainer.flows],
                     "x": [[float(f"{v:.4g}") for v in f.x_norms] for _, f in trainer.flows],
                     "loss": [f.loss for _, f in trainer.flows]},
        "resume": trainer.resume_state()[1],
    }


def _with_suffix(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def _temp_file(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty file .NAME.RANDOM.tmp in `folder`, opened for writing. Mode 0o666 lets the
    kernel apply the process's umask, so the checkpoint gets what a plain open() would give."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:     # 64 random bits taken already: draw again
            continue


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file its name, atomically. Without `overwrite`, a hard link
    claims the name only if it is free (the kernel checks and creates in one step, so a racing
    save cannot be replaced); filesystems without hard links fall back to a check, then a rename."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CheckpointExists(path) from None
    except OSError:                 # no hard links here (EPERM, ENOTSUP, ...)
        if os.path.lexists(path):
            raise CheckpointExists(path) from None
        os.replace(tmp, path)
        return
    try:
        tmp.unlink()
    except OSError:                 # the checkpoint is in place; a stray temp file is harmless
        pass


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict, overwrite: bool = False,
                    optimizer: dict | None = None) -> Path:
    """Write weights + metadata atomically (temporary file in the same folder, then a link or a
    rename). An existing file is replaced only with `overwrite`; otherwise CheckpointExists, and
    the existing file is left exactly as it was."""
    path = _with_suffix(path)
    if not overwrite and os.path.lexists(path):    # refuse early; _publish makes the refusal race-free
        raise CheckpointExists(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {OPTIMIZER + k: v.detach().cpu().contiguous() for k, v in (optimizer or {}).items()}
    data = safetensors.torch.save(tensors, metadata={"charrnn": json.dumps(metadata)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(path.parent, path.name)
    except OSError as e:
        raise CheckpointError(f"Cannot write a checkpoint in {path.parent} ({e.strerror}).") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"Cannot write {path} ({e.strerror}).") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail early, before hours of training, when `path` cannot be written or (without
    `overwrite`) is taken already: CheckpointExists, as save_checkpoint would raise."""
    path = _with_suffix(path)
    if not overwrite and os.path.lexists(path):
        raise CheckpointExists(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".charrnn-check", suffix=".tmp"):
            pass
    except OSError as e:
        raise CheckpointError(f"Cannot write a checkpoint in {folder} ({e.strerror}).") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The charrnn metadata of a checkpoint file, checked; CheckpointError with one sentence if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}.")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint (empty, truncated or another format).") from None
    try:
        meta = json.loads(header["charrnn"])
        assert meta.get("format") == FORMAT
    except Exception:
        raise CheckpointError(f"{path} is a safetensors file but not a charrnn checkpoint.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}; this charrnn "
                              f"reads format {FORMAT_VERSION}.")
    missing = [k for k in ("model", "vocab", "corpus", "metrics") if not isinstance(meta.get(k), (dict, list))]
    if missing:
        raise CheckpointError(f"{path} is damaged: its metadata lacks {', '.join(missing)}.")
    return meta


def load_checkpoint(path: str | os.PathLike, device="cpu") -> Loaded:
    """The model (in eval mode, on `device`), its vocabulary and metadata."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        config = ModelConfig(**meta["model"])
        vocab = Vocab(idx_to_token=meta["vocab"])
        if len(vocab) != config.vocab_size:
            raise ValueError("vocabulary size")
        tensors = safetensors.torch.load_file(str(path))
        optimizer = {k[len(OPTIMIZER):]: tensors.pop(k) for k in list(tensors) if k.startswith(OPTIMIZER)}
        model = build_model(config, device=device)            # the fastest fp32 kernel there
        model.load_state_dict(tensors, strict=True)
    except Exception:
        raise CheckpointError(f"{path} is damaged: its weights do not match its model description.") from None
    return Loaded(model=model.to(device).eval(), vocab=vocab, meta=meta, path=path, optimizer=optimizer)


MAX_IMPORT_BYTES = 200 * 2**20   # an uploaded checkpoint; the seed's largest model is a few MB


def import_checkpoint(data: bytes, name: str, folder: Path | None = None, overwrite: bool = False) -> Path:
    """A checkpoint that came from elsewhere (the app's upload), as bytes: refused above
    MAX_IMPORT_BYTES, checked like any checkpoint (its metadata, its weights against its model
    description; safetensors only, nothing is unpickled), then saved as checkpoints/NAME.safetensors
    (CheckpointExists for a taken name unless `overwrite`). CheckpointError with one sentence."""
    if len(data) > MAX_IMPORT_BYTES:
        raise CheckpointError(f"{name} is {len(data) / 2**20:.0f} MB; a checkpoint here is at most "
                              f"{MAX_IMPORT_BYTES // 2**20} MB.")
    path = path_for_name(name, folder)
    with tempfile.TemporaryDirectory(prefix="charrnn-import-") as tmp:
        staged = Path(tmp) / path.name
        staged.write_bytes(data)
        try:
            loaded = load_checkpoint(staged)
        except CheckpointError as e:                 # name the upload, not the staging folder
            raise CheckpointError(str(e).replace(str(staged), path.name)) from None
    return save_checkpoint(path, loaded.model, loaded.meta, overwrite=overwrite, optimizer=loaded.optimizer)


def list_checkpoints(folder: Path | None = None) -> list[dict]:
    """Every *.safetensors in the folder with a short summary; unreadable ones carry an `error`."""
    folder = folder or checkpoint_dir()
    found = []
    for path in sorted(folder.glob("*" + SUFFIX)):
        entry = {"name": path.stem, "path": str(path)}
        try:
            meta = read_metadata(path)
            m, metrics = meta["model"], meta.get("metrics", {})
            entry |= {"model": m["kind"], "hidden": m["hidden_size"], "layers": m["num_layers"],
                      "epochs": metrics.get("epochs"), "perplexity": metrics.get("perplexity"),
                      "val_perplexity": metrics.get("val_perplexity"), "corpus": meta["corpus"]["name"],
                      "created": meta.get("created"),
                      "resumable": isinstance(meta.get("resume"), dict)}   # saved with its optimizer state
        except CheckpointError as e:
            entry["error"] = str(e)
        except (KeyError, TypeError):
            entry["error"] = f"{path} is damaged: its metadata is incomplete."
        found.append(entry)
    return found
