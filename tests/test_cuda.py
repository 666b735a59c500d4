"""The CUDA path, where there is a GPU (CI has none; on a machine with one:
`CHARRNN_DATA=../shared/data python -m pytest tests/test_cuda.py`). A recorded CUDA graph must
train the same numbers as op by op."""
import pytest
import torch

from charrnn.train import TrainConfig, Trainer, TrainingDiverged

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(corpus, **settings):
    settings = {"epochs": 4} | settings
    trainer = Trainer(TrainConfig(device="cuda", sample_every=10**6, **settings), corpus)
    return trainer, [s.train_ppl for s in trainer.run() if s.epoch > 0]


@pytest.mark.parametrize("model, sampling", [("scratch", "sequential"), ("rnn", "random"), ("lstm", "sequential")])
def test_graph_replays_train_the_same_numbers(corpus, model, sampling):
    graphed, ppl_graph = run(corpus, model=model, sampling=sampling)
    eager, ppl_eager = run(corpus, model=model, sampling=sampling, cuda_graphs=False)
    assert graphed.graphed and graphed.graph_failed is None and not eager.graphed
    torch.testing.assert_close(ppl_graph, ppl_eager, rtol=1e-3, atol=0)
    for (name, a), b in zip(graphed.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_divergence_keeps_the_last_good_weights_with_a_graph(corpus):
    trainer = Trainer(TrainConfig(device="cuda", model="scratch", lr=1e30, clip=0, epochs=50), corpus)
    with pytest.raises(TrainingDiverged, match="diverged"):
        list(trainer.run())
    assert trainer.graphed
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_step_that_cannot_be_recorded_trains_op_by_op(corpus, monkeypatch):
    trainer = Trainer(TrainConfig(device="cuda", epochs=3, sample_every=10**6), corpus)
    minibatch = trainer.minibatch

    def refuses_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this op cannot be recorded")
        return minibatch(*args, **kwargs)

    monkeypatch.setattr(trainer, "minibatch", refuses_capture)
    ppl = [s.train_ppl for s in trainer.run() if s.epoch > 0]
    assert not trainer.graphed and "cannot be recorded" in trainer.graph_failed
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not left on the capture stream
    _, ppl_eager = run(corpus, epochs=3, cuda_graphs=False)
    torch.testing.assert_close(ppl, ppl_eager, rtol=1e-3, atol=0)


def test_a_run_continued_records_again_and_matches_one_long_run(corpus):
    trainer = Trainer(TrainConfig(device="cuda", epochs=2, sample_every=10**6), corpus)
    first = [s.train_ppl for s in trainer.run() if s.epoch > 0]
    assert trainer.step.graph is None                               # released when the run ended
    second = [s.train_ppl for s in trainer.run()]
    assert trainer.graphed and trainer.epoch == 4
    _, ppl_eager = run(corpus, epochs=4, cuda_graphs=False)
    torch.testing.assert_close(first + second, ppl_eager, rtol=1e-3, atol=0)
