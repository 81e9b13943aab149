"""Runs that are killed and resumed end exactly as the uninterrupted run: mid-epoch, after the last step, and after a
real SIGKILL while a checkpoint was being written (examples/run_erc.py end to end, tiny backbones).

The runs are compared with `torch.equal`, not a tolerance: on CPU with one thread, a resumed run performs the same
operations in the same order on the same values (weights, optimizer and scheduler states, random states, batches),
so anything short of bit-identical weights means some state did not resume."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, common_args, run_erc
from safetensors.torch import load_file

from mister_e_hf.checkpoints import checkpoint_problem, find_resumable_checkpoint


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = ["--num_train_epochs", "4", "--save_strategy", "steps", "--save_steps", "4", "--eval_strategy", "steps",
         "--eval_steps", "4", "--logging_strategy", "steps", "--logging_steps", "3", "--save_total_limit", "100"]
"""12 training conversations in batches of 4: 3 steps per epoch, 12 in all; checkpoints at steps 4 and 8 fall inside
an epoch (its first and second step), and logs (every 3 steps) fall between checkpoints."""


def arguments(tiny_backbones, corpus, output_dir, cache_dir):
    return [*common_args(tiny_backbones, corpus, output_dir, cache_dir), *STEPS]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_backbones, corpus):
    """(folder, cache folder) of the uninterrupted run."""
    folder = tmp_path_factory.mktemp("resume")
    result = run_erc(*arguments(tiny_backbones, corpus, folder / "straight", folder / "cache"), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "straight", folder / "cache"


def copy_as_killed_after(run, destination, step):
    """The run folder as a kill right after `checkpoint-<step>` landed leaves it: the checkpoints up to it (and the
    data report, written first), no later checkpoint, no final outputs."""
    destination.mkdir()
    for path in run.iterdir():
        found = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if found and int(found.group(1)) <= step:
            shutil.copytree(path, destination / path.name)
    shutil.copy(run / "data_report.json", destination)


def assert_same_run(folder, reference):
    for weights in ("model.safetensors", "checkpoint-12/model.safetensors"):  # the best (final) and last weights
        a, b = load_file(folder / weights), load_file(reference / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    results = [json.loads((d / "train_results.json").read_text()) for d in (folder, reference)]
    assert results[0]["train_loss"] == results[1]["train_loss"]  # the mean over all 12 steps, not the resumed part
    logs = [[{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
             for entry in json.loads((d / "trainer_state.json").read_text())["log_history"]]
            for d in (folder, reference)]
    assert logs[0] == logs[1]  # every logged loss and evaluation, and the best checkpoint
    tests = [json.loads((d / "test_results.json").read_text()) for d in (folder, reference)]
    assert tests[0]["test_weighted_f1"] == tests[1]["test_weighted_f1"]


@pytest.mark.parametrize("step", [4, 12], ids=["mid-epoch", "after-the-last-step"])
def test_a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(straight, tiny_backbones, corpus, tmp_path,
                                                                        step):
    reference, cache = straight
    folder = tmp_path / "resumed"
    copy_as_killed_after(reference, folder, step)
    result = run_erc(*arguments(tiny_backbones, corpus, folder, cache), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {folder / f'checkpoint-{step}'}" in result.stdout
    assert_same_run(folder, reference)
    assert json.loads((folder / "train_results.json").read_text())["resumed_from_checkpoint"] == f"checkpoint-{step}"


KILL_WHILE_SAVING = """
import os, runpy, signal, sys
from transformers import Trainer

save = Trainer._save_optimizer_and_scheduler

def killed_while_saving(self, output_dir):  # weights written, optimizer, scheduler and trainer state not yet
    if os.path.basename(output_dir) == "checkpoint-8":
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, output_dir)

Trainer._save_optimizer_and_scheduler = killed_while_saving
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(straight, tiny_backbones, corpus,
                                                                                     tmp_path):
    reference, cache = straight
    folder = tmp_path / "killed"
    args = [str(a) for a in arguments(tiny_backbones, corpus, folder, cache)] + ["--save_total_limit", "2"]
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(REPO_ROOT / "examples" / "run_erc.py"),
                             *args], capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert killed.returncode == -9, killed.stderr[-3000:]
    torn = folder / "checkpoint-8"
    assert (torn / "model.safetensors").exists() and not (torn / "trainer_state.json").exists()
    assert checkpoint_problem(torn) == "it has no trainer_state.json"

    explicit = run_erc(*args, "--resume_from_checkpoint", torn, env=ONE_THREAD)  # named by hand: refused, untouched
    assert explicit.returncode == 1
    assert explicit.stderr.strip().splitlines()[-1] == (
        f"run_erc.py: error: Cannot resume from --resume_from_checkpoint {torn}: it has no trainer_state.json.")
    assert torn.is_dir()

    resumed = run_erc(*args, env=ONE_THREAD)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {folder / 'checkpoint-4'}" in resumed.stdout
    assert "checkpoint-8 is incomplete (it has no trainer_state.json)" in resumed.stdout
    aside = folder / "incomplete-checkpoint-8"  # moved aside, never deleted, not even by Trainer's rotation
    assert (aside / "model.safetensors").exists() and not (aside / "trainer_state.json").exists()
    assert len(list(folder.glob("checkpoint-*"))) == 2  # the rotation ran (last and best kept) and spared it
    assert_same_run(folder, reference)


def test_find_resumable_checkpoint_moves_aside_every_incomplete_checkpoint(straight, tmp_path):
    reference, _ = straight
    folder = tmp_path / "run"
    copy_as_killed_after(reference, folder, 12)
    (folder / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 1')  # torn state
    weights = folder / "checkpoint-8" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # torn weights
    os.makedirs(folder / "incomplete-checkpoint-12")  # a name taken by an earlier kill
    assert "does not parse" in checkpoint_problem(folder / "checkpoint-12")
    assert "do not load" in checkpoint_problem(folder / "checkpoint-8")
    assert find_resumable_checkpoint(folder) == str(folder / "checkpoint-4")
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-4", "data_report.json", "incomplete-checkpoint-12", "incomplete-checkpoint-12.2",
        "incomplete-checkpoint-8"]
    assert (folder / "incomplete-checkpoint-8" / "optimizer.pt").exists()  # moved whole
    assert find_resumable_checkpoint(tmp_path / "empty") is None
