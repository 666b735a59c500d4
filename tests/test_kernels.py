"""Choosing the kernel: one selector, its choice for each CPU kind (the features faked), forcing a
kernel, and the name reaching the CLI's JSON and the checkpoint."""
import json
import types

import pytest
import torch

from charrnn import kernels
from charrnn.kernels import bf16, bf16gemm, fp32
from charrnn.models import ModelConfig, build_model
from charrnn.train import TrainConfig, Trainer

SCRATCH, RNN, GRU = ModelConfig("scratch", 28, 512), ModelConfig("rnn", 28, 256), ModelConfig("gru", 28, 256)
BIRNN = ModelConfig("rnn", 28, 256, bidirectional=True)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_cpu(monkeypatch, *, fp32_variants=(), bf16_matmul=False, amx=False, compiler=True):
    """This process as if it ran on another CPU: which fp32 C variants load, whether MKL's bf16
    matmul runs, whether the bf16 loops have AMX tiles, whether a C compiler is there."""
    def load(name):
        if not compiler:
            return None, "no C compiler (cc)"
        return (object(), "") if name in fp32_variants else (None, f"this CPU lacks {name.split('-')[0]}")
    monkeypatch.setattr(fp32, "load", load)
    monkeypatch.setattr(bf16gemm, "available", lambda: bf16_matmul)
    loops = types.SimpleNamespace(_amx=amx) if bf16_matmul and compiler else None
    monkeypatch.setattr(bf16, "loops", lambda: loops)
    monkeypatch.setattr(bf16, "status", lambda: "faked")


XEON_AMX = dict(fp32_variants=("avx512-fp32", "avx2-fp32"), bf16_matmul=True, amx=True)
ZEN5 = dict(fp32_variants=("avx512-fp32", "avx2-fp32"), bf16_matmul=True)    # AVX-512 + AVX512-BF16, no AMX
ZEN3 = dict(fp32_variants=("avx2-fp32",))                                    # AVX2 + FMA only
# generic-fp32 runs on every x86 CPU too, but below the others: left out of the faked CPUs


@pytest.mark.parametrize("cpu, scratch, fp32_choice", [
    (XEON_AMX, "amx-bf16", "avx512-fp32"),
    (ZEN5, "avx512-fp32", "avx512-fp32"),
    (ZEN3, "avx2-fp32", "avx2-fp32"),
    (dict(ZEN3, compiler=False), "torch-fp32", "torch-fp32"),
])
def test_auto_picks_the_fastest_for_each_cpu_kind(monkeypatch, cpu, scratch, fp32_choice):
    fake_cpu(monkeypatch, **cpu)
    assert kernels.select(SCRATCH, CPU).name == scratch
    assert kernels.select(RNN, CPU).name == scratch                     # nn.RNN's weights, the same loops
    assert kernels.select(SCRATCH, CPU, "fp32").name == fp32_choice
    assert kernels.select(GRU, CPU).name == kernels.select(BIRNN, CPU).name == "reference"  # torch.nn's layer
    assert kernels.select(SCRATCH, CUDA).name == kernels.select(GRU, CUDA).name == "cudnn"
    assert kernels.select(SCRATCH, "mps").name == "torch-fp32"          # torch ops run on any device


def test_bf16_kernels_evaluate_in_fp32(monkeypatch):
    fake_cpu(monkeypatch, **XEON_AMX)
    kernel = kernels.select(SCRATCH, CPU)
    assert (kernel.name, kernel.precision) == ("amx-bf16", "bf16")
    assert kernel.for_mode(training=True) is kernel
    assert kernel.for_mode(training=False).name == "avx512-fp32"
    assert kernels.select(SCRATCH, CPU, "bf16").name == "amx-bf16"
    fake_cpu(monkeypatch, **ZEN5)
    assert kernels.select(SCRATCH, CPU, "bf16").name == "mkl-bf16"


def test_a_lower_kernel_can_be_forced(monkeypatch):
    """An AVX-512 (or AMX) machine measures what an AVX2-only CPU runs."""
    fake_cpu(monkeypatch, **XEON_AMX)
    assert kernels.select(SCRATCH, CPU, name="avx2-fp32").name == "avx2-fp32"
    assert kernels.select(SCRATCH, CPU, name="torch-fp32").name == "torch-fp32"
    assert kernels.select(SCRATCH, CPU, name="reference").name == "reference"


@pytest.mark.parametrize("cpu, config, precision, name, message", [
    (ZEN3, SCRATCH, "auto", "avx512-fp32", "Kernel avx512-fp32 cannot run here: this CPU lacks avx512"),
    (ZEN3, SCRATCH, "bf16", "auto", "Precision bf16 is not available: this machine has no fast bf16 matmul"),
    (ZEN5, SCRATCH, "auto", "amx-bf16", "no AMX tiles"),
    (XEON_AMX, GRU, "auto", "avx2-fp32", "covers the tanh RNNs"),
    (XEON_AMX, GRU, "bf16", "auto", "Precision bf16 is not available: it covers the tanh RNNs"),
    (XEON_AMX, SCRATCH, "fp32", "amx-bf16", "trains in bf16, not fp32"),
    (XEON_AMX, SCRATCH, "auto", "cudnn", "CUDA GPU only"),
    (XEON_AMX, SCRATCH, "auto", "avx9-fp32", "Unknown kernel"),
])
def test_a_kernel_that_cannot_run_is_one_sentence(monkeypatch, cpu, config, precision, name, message):
    fake_cpu(monkeypatch, **cpu)
    with pytest.raises(ValueError, match=message) as e:
        kernels.select(config, CPU, precision, name)
    assert "\n" not in str(e.value)


def test_every_name_is_listed_with_its_reason(monkeypatch):
    fake_cpu(monkeypatch, **ZEN3)
    found = kernels.choices(SCRATCH, CPU)
    assert set(found) == set(kernels.NAMES)
    assert [n for n, why in found.items() if why is None] == ["avx2-fp32", "torch-fp32", "reference"]
    fake_cpu(monkeypatch, fp32_variants=("generic-fp32",))               # another architecture
    assert kernels.select(SCRATCH, CPU).name == "generic-fp32"


def test_the_name_reaches_the_trainer_the_json_and_the_checkpoint(small_corpus, ckpt_dir, small_text_file):
    from charrnn.checkpoint import load_checkpoint, make_metadata, save_checkpoint
    trainer = Trainer(TrainConfig(model="rnn", hidden_size=16, epochs=1, kernel="torch-fp32"), small_corpus)
    assert trainer.model.kernel is trainer.kernel and trainer.kernel.name == "torch-fp32"
    list(trainer.run())
    path = save_checkpoint(ckpt_dir / "k", trainer.model, make_metadata(trainer))
    assert load_checkpoint(path).meta["train"]["kernel"] == "torch-fp32"
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "charrnn", "train", "--model", "rnn", "--hidden", "16", "--epochs",
                        "1", "--kernel", "reference", "--corpus", str(small_text_file), "--json", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["kernel"], out["fused"], out["precision"]) == ("reference", False, "fp32")


def test_build_model_runs_the_fastest_fp32_kernel():
    model = build_model(SCRATCH)
    assert model.kernel == kernels.select(SCRATCH, CPU, "fp32")
    assert build_model(SCRATCH, kernel="reference").kernel.name == "reference"


@pytest.mark.parametrize("cpu, threads", [(XEON_AMX, 1), (ZEN5, 2), (ZEN3, 2)])
def test_the_apps_threads_follow_the_kernel(monkeypatch, cpu, threads):
    """AMX's bf16 loops leave a core to the browser; the C fp32 loops take both."""
    fake_cpu(monkeypatch, **cpu)
    assert kernels.app_threads(2) == threads and kernels.app_threads(1) == 1


def test_a_cpu_kernel_forced_on_a_gpu_is_one_sentence(monkeypatch):
    fake_cpu(monkeypatch, **ZEN5)
    with pytest.raises(ValueError, match="Kernel avx2-fp32 cannot run here: it runs on the CPU, not on cuda"):
        kernels.select(SCRATCH, CUDA, name="avx2-fp32")
    assert kernels.select(SCRATCH, CUDA, name="torch-fp32").name == "torch-fp32"   # torch ops run there


def test_auto_builds_nothing_below_its_choice(monkeypatch):
    """The first kernel that runs wins; the C libraries of the lower ones are not built for it."""
    fake_cpu(monkeypatch, **ZEN5)
    asked = []
    real = fp32.load
    monkeypatch.setattr(fp32, "load", lambda name: asked.append(name) or real(name))
    assert kernels.select(SCRATCH, CPU).name == "avx512-fp32" and asked == ["avx512-fp32"]
