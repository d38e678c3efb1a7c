"""One path for each job in fine-tuning: SetFit trains in the shared loop (``training.train``), so a killed run
resumes from its checkpoint and ends as an uninterrupted one; its refitted probe keeps the head's C (the epoch is
the only choice made on val, which the decision's test pays for); ``train`` takes its options as one object.
Real all-MiniLM-L6-v2 weights on real BBC News articles; a crash is a real exception in the middle of a run."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from featurestore.configs import SetFitConfig
from featurestore.errors import BadValueError
from featurestore.transfer.setfit import setfit_text

from .conftest import bbc_store_and_head

pytestmark = pytest.mark.slow

# Small: 2 epochs of 32 pairs (4 steps each) on the top layer, at 64 tokens.
CONFIG = SetFitConfig(iterations=2, max_pairs=32, unfreeze_blocks=1, lr=1e-4, epochs=2, batch_size=8, max_length=64)
HEAD_C = 10.0  # the head's C, far from what a sweep on 10 val texts picks (its smallest C, on ties)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
    """3 train, 2 val, 1 test real BBC articles per topic, their store at 64 tokens and a logreg head at C 10."""
    data, _, head = bbc_store_and_head(tmp_path_factory.mktemp("skeleton"), 3, 2, 1, seed=4)
    return data, replace(head, C=HEAD_C)


@pytest.fixture(scope="module")
def uninterrupted(articles, tmp_path_factory):
    data, head = articles
    out = tmp_path_factory.mktemp("straight") / "setfit.pth"
    return setfit_text(head, data, out, CONFIG, device="cpu", progress=False), out


def test_every_setfit_epoch_refits_the_probe_at_the_heads_c(uninterrupted):
    result, _ = uninterrupted
    assert [epoch["C"] for epoch in result.history] == [HEAD_C] * CONFIG.epochs
    assert result.C == HEAD_C and len(result.epoch_val_predictions) == CONFIG.epochs


def test_a_killed_setfit_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(articles, uninterrupted,
                                                                                         tmp_path):
    data, head = articles
    straight, straight_out = uninterrupted
    out = tmp_path / "setfit.pth"
    checkpoint = tmp_path / "setfit.checkpoints" / "last.pt"

    def crash_after_the_first_checkpoint(module, inputs):
        if checkpoint.exists():  # epoch 1 is saved: the first step of epoch 2 dies
            raise Crash()

    hook = torch.nn.modules.module.register_module_forward_pre_hook(crash_after_the_first_checkpoint)
    try:
        with pytest.raises(Crash):
            setfit_text(head, data, out, CONFIG, device="cpu", progress=False)
    finally:
        hook.remove()
    assert checkpoint.exists() and not out.exists()
    resumed = setfit_text(head, data, out, CONFIG, device="cpu", progress=False)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == CONFIG.epochs
    assert not checkpoint.exists()  # finished: nothing left to resume
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.best_val_predictions == straight.best_val_predictions
    assert resumed.epoch_val_predictions == straight.epoch_val_predictions
    assert resumed.test_accuracy == straight.test_accuracy
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
        assert got["separation"] == pytest.approx(want["separation"], rel=1e-6)
    a, b = (torch.load(path, weights_only=True) for path in (straight_out, out))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


class RandomBatches:
    """Fixed random features of two classes: (B, 8) float32 inputs, (B,) int64 labels."""

    n_train = 64

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.normal(size=(96, 8)).astype(np.float32))
        self.y = torch.from_numpy((rng.random(96) < 0.5).astype(np.int64))

    def train_batches(self, epoch, batch_size):
        order = np.random.default_rng(epoch).permutation(self.n_train)
        for start in range(0, self.n_train, batch_size):
            picked = order[start:start + batch_size]
            yield self.x[picked], self.y[picked]

    def eval_batches(self, split):
        yield self.x[self.n_train:], self.y[self.n_train:]


def test_train_takes_one_options_object_resolved_once():
    from featurestore.transfer.training import TrainOptions, train

    def run(**how):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        result, _ = train(model, model.state_dict, optimizer, RandomBatches(), **how)
        return result

    options = TrainOptions(epochs=3, batch_size=16, patience=None, device=torch.device("cpu"), warmup_steps=2,
                           progress=False)
    given = run(options=options)
    keywords = run(epochs=3, batch_size=16, patience=None, device=torch.device("cpu"), warmup_steps=2,
                   progress=False)
    assert [h["train_loss"] for h in given.history] == [h["train_loss"] for h in keywords.history]
    assert given.epoch_val_predictions == keywords.epoch_val_predictions and given.steps == 12
    with pytest.raises(BadValueError, match="options or keywords"):
        run(options=options, epochs=2)
    with pytest.raises(BadValueError, match="rounds of steps cannot resume"):
        replace(options, round_steps=2, checkpoint="last.pt")
