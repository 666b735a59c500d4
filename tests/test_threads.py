"""CPU threads per run: a job's count is its own thread's, never the process's (the app's other
threads and later runs keep theirs)."""
import threading

import pytest
import torch

from charrnn.device import cpu_threads, default_threads, threads_settable
from charrnn.jobs import Job
from charrnn.train import TrainConfig, Trainer

needs_two = pytest.mark.skipif(torch.get_num_threads() < 2 or not threads_settable(),
                               reason="PyTorch has one thread here, or no GNU OpenMP and MKL to set per thread")


def mkl_threads() -> int:
    """MKL's thread count for the calling thread (what its matmuls, bf16 ones included, use)."""
    import ctypes
    from pathlib import Path
    fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Get_Max_Threads
    fn.restype = ctypes.c_int
    return fn()


def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()))
    t.start()
    t.join(60)
    return out["value"]


@needs_two
def test_cpu_threads_is_per_thread_and_restored():
    before = torch.get_num_threads()
    inside = threading.Event()
    leave = threading.Event()
    seen = {}

    def worker():
        with cpu_threads(1):
            seen["worker"] = torch.get_num_threads()
            seen["worker_mkl"] = mkl_threads()
            inside.set()
            leave.wait(30)
        seen["after"] = torch.get_num_threads()
        seen["after_mkl"] = mkl_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(30)
    seen["main"] = torch.get_num_threads()                      # while the worker holds 1 thread
    seen["main_mkl"] = mkl_threads()
    seen["new"] = in_thread(torch.get_num_threads)              # a thread started meanwhile
    leave.set()
    t.join(30)
    assert seen == {"worker": 1, "worker_mkl": 1, "main": before, "main_mkl": before, "new": before,
                    "after": before, "after_mkl": before}
    assert default_threads() == before


def test_zero_leaves_the_count_alone():
    before = torch.get_num_threads()
    with cpu_threads(0):
        assert torch.get_num_threads() == before


@needs_two
def test_a_job_trains_on_its_threads_only(small_corpus):
    seen = []
    job = Job(TrainConfig(model="rnn", hidden_size=16, epochs=2, threads=1), small_corpus)
    original = job.trainer.train_epoch

    def spy(stop=None):
        seen.append(torch.get_num_threads())
        return original(stop)

    job.trainer.train_epoch = spy
    job.start().join(60)
    assert job.snapshot().status == "finished"
    assert seen == [1, 1] and torch.get_num_threads() == in_thread(torch.get_num_threads) >= 2
    assert "--threads 1" in job.cli_command()


def test_threads_are_checked(small_corpus):
    with pytest.raises(ValueError, match="Threads must be between 0"):
        TrainConfig(threads=-1)
    trainer = Trainer(TrainConfig(model="rnn", hidden_size=16, epochs=1, threads=1), small_corpus)
    assert [s.epoch for s in trainer.run()] == [0, 1]


@needs_two
def test_c_kernel_runs_its_team_on_the_runs_threads(small_corpus, monkeypatch):
    """On a C fp32 kernel with a team the loops' team takes the run's threads and torch's ops
    one (their OpenMP threads would spin on the team's cores); other kernels give torch's ops
    the run's."""
    from charrnn import kernels
    from charrnn.kernels import fp32
    name = next((n for n in kernels.C_FP32 if fp32.load(n)[0] is not None and fp32.load(n)[0].owns_matmuls), None)
    if name is None:
        pytest.skip(f"no C fp32 kernel with vectors builds here: {fp32.load()[1] or 'only the generic build'}")
    seen = []
    original = fp32.tanh_rnn_layer_fp32

    def spy(*args, threads=None, **kw):
        seen.append((threads, torch.get_num_threads()))
        return original(*args, threads=threads, **kw)

    monkeypatch.setattr(fp32, "tanh_rnn_layer_fp32", spy)
    trainer = Trainer(TrainConfig(model="scratch", hidden_size=16, epochs=1, threads=2, kernel=name,
                                  probe_every=0), small_corpus)
    list(trainer.run())
    assert seen and set(seen) == {(2, 1)}
    torch_seen = []
    trainer = Trainer(TrainConfig(model="scratch", hidden_size=16, epochs=1, threads=2, kernel="torch-fp32",
                                  probe_every=0), small_corpus)
    trainer.train_epoch = lambda stop=None, f=trainer.train_epoch: torch_seen.append(torch.get_num_threads()) or f(stop)
    list(trainer.run())
    assert torch_seen == [2]
