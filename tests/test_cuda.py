"""The CUDA path, where there is a GPU (CI has none: these run on a machine lent with one, through
bench/gpu_check.py's companion command in the README). A recorded CUDA graph must train the same
numbers as op by op."""
import pytest
import torch

from charrnn.train import TrainConfig, Trainer, TrainingDiverged

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(corpus, **settings):
    trainer = Trainer(TrainConfig(device="cuda", epochs=4, sample_every=10**6, **settings), corpus)
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
