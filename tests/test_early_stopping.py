"""`run_erc.py --early_stopping_patience`: training stops before `num_train_epochs` once validation stops improving,
and without it the same run goes the full length. Two tiny runs (frozen backbones, a learning rate too small for the
validation metric to move; --do_train: no final evaluation or test predictions), identical but for the patience."""

import json

import pytest
from helpers import common_args, run_erc


EPOCHS = 3


def evaluations(state: dict) -> list[tuple[float, float]]:
    """(epoch, validation weighted F1) of each evaluation in a trainer_state.json's log history."""
    return [(entry["epoch"], entry["eval_weighted_f1"]) for entry in state["log_history"]
            if "eval_weighted_f1" in entry]


@pytest.fixture(scope="module")
def flat_runs(tmp_path_factory, tiny_backbones, corpus):
    """{patience: trainer_state.json} of two runs whose validation metric cannot improve (learning rate 1e-9)."""
    folder = tmp_path_factory.mktemp("early-stopping")
    states = {}
    for patience in (None, 1):
        output = folder / f"patience-{patience}"
        extra = ["--early_stopping_patience", str(patience)] if patience else []
        result = run_erc(*common_args(tiny_backbones, corpus, output, folder / "cache"), "--num_train_epochs",
                         str(EPOCHS), "--learning_rate", "1e-9", "--do_train", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        states[patience] = json.loads((output / "trainer_state.json").read_text())
    return states


def test_without_early_stopping_the_run_goes_the_full_length(flat_runs):
    state = flat_runs[None]
    history = evaluations(state)
    assert [epoch for epoch, _ in history] == [1.0, 2.0, 3.0]
    assert len({f1 for _, f1 in history}) == 1  # validation never improved, and training went on
    assert state["epoch"] == EPOCHS and state["global_step"] == state["max_steps"]


def test_early_stopping_patience_stops_training_when_validation_does_not_improve(flat_runs):
    state, full = flat_runs[1], flat_runs[None]
    history = evaluations(state)
    assert [epoch for epoch, _ in history] == [1.0, 2.0]  # epoch 2 did not improve on epoch 1: patience 1 is spent
    assert history[1][1] == history[0][1]
    assert state["epoch"] == 2.0 < EPOCHS
    assert state["global_step"] == 2 * full["global_step"] // EPOCHS < state["max_steps"] == full["max_steps"]
    assert state["best_metric"] == history[0][1]
    assert [e for e in state["log_history"] if "train_loss" in e][-1]["epoch"] == 2.0
