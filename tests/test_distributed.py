"""A real 2-process run of examples/run_erc.py (torchrun, gloo on CPUs) against a 1-process run with the same global
batch: extraction shared between the processes, the same training and metrics, one prediction line per utterance,
only the main process writing the run folder, and a 2-process checkpoint resumed in 2 processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO_ROOT, common_args, write_corpus

pytestmark = pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                                reason="this torch build has no torch.distributed")

# Every write a process makes under TRACE_DIR, recorded per rank: the main process must be the only one writing
# the run folder (the embedding cache is written by every process, each its own shards).
TRACER = textwrap.dedent("""
    import builtins, io, os
    _root, _log = os.environ.get("TRACE_DIR"), os.environ.get("TRACE_LOG")
    if _root and _log:
        _log = f"{_log}.{os.environ.get('RANK', '0')}"
        def _note(path):
            path = os.path.abspath(os.fspath(path))
            if path.startswith(_root + os.sep):
                with _open(_log, "a") as f:
                    f.write(path + "\\n")
        _open, _os_open, _replace, _rename = builtins.open, os.open, os.replace, os.rename
        def open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                _note(file)
            return _open(file, mode, *args, **kwargs)
        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                _note(path)
            return _os_open(path, flags, *args, **kwargs)
        def replace(src, dst, *args, **kwargs):
            _note(dst)
            return _replace(src, dst, *args, **kwargs)
        def rename(src, dst, *args, **kwargs):
            _note(dst)
            return _rename(src, dst, *args, **kwargs)
        builtins.open = io.open = open
        os.open, os.replace, os.rename = os_open, replace, rename
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbones):
    """Run folders of the same training in 1 process (batch 8) and 2 processes (batch 4 each), and of the 2-process
    run resumed in 2 processes from its first-epoch checkpoint."""
    folder = tmp_path_factory.mktemp("distributed")
    corpus = write_corpus(folder / "corpus", conversations=16)  # 2 global batches of 8 per epoch
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(TRACER)

    def run(processes: int, name: str, *extra, launcher=None):
        args = common_args(tiny_backbones, corpus, folder / name, folder / f"{name}-cache")
        args[args.index("--per_device_train_batch_size") + 1] = str(8 // processes)
        overrides = args.index("--config_overrides") + 1
        args[overrides] += ",dropout=0.0,standardize_embeddings=true"  # dropout masks differ between processes
        args += ["--num_train_epochs", "3", "--learning_rate", "3e-3", "--do_train", "--do_eval", "--do_predict",
                 "--per_device_eval_batch_size", "2", "--save_strategy", "epoch", *extra]
        if launcher is None:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(folder / "site"),
               "TRACE_DIR": str(folder / name), "TRACE_LOG": str(folder / f"{name}.writes")}
        result = subprocess.run([*launcher, str(REPO_ROOT / "examples" / "run_erc.py"), *map(str, args)],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return folder / name

    one, two = run(1, "one"), run(2, "two")
    resumed = run(2, "resumed", "--resume_from_checkpoint", two / "checkpoint-2")
    accelerate = run(2, "accelerate", launcher=[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                                 str(REPO_ROOT / "examples" / "accelerate" / "multi_gpu.yaml"),
                                                 "--num_processes", "2", "--main_process_port", str(free_port())])
    mixed = run(2, "mixed", "--bf16", "--use_cpu", "true", "--backbone_finetuning", "lora", "--finetuning_epochs", "1",
                "--gradient_checkpointing")
    return {"one": one, "two": two, "resumed": resumed, "accelerate": accelerate, "mixed": mixed,
            "corpus": corpus, "folder": folder}


def results(folder):
    return json.loads((folder / "all_results.json").read_text())


def test_each_utterance_is_embedded_by_exactly_one_process(runs):
    one, two = results(runs["one"]), results(runs["two"])
    per_rank = two["utterances_embedded_per_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0
    assert sum(per_rank) == two["utterances_embedded"] == one["utterances_embedded"] > 0
    # every process then trained on the whole cached split, with the same embedding statistics
    digests = two["embedding_statistics_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert two["num_processes"] == 2 and one["num_processes"] == 1


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    one, two = results(runs["one"]), results(runs["two"])
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    for split in ("eval", "test"):
        for metric in ("accuracy", "weighted_f1", "macro_f1", "gate_speech", "gate_text", "gate_cross-modal"):
            assert two[f"{split}_{metric}"] == pytest.approx(one[f"{split}_{metric}"], abs=1e-5), (split, metric)
    states = [json.loads((runs[name] / "trainer_state.json").read_text()) for name in ("one", "two")]
    assert states[0]["global_step"] == states[1]["global_step"] == 6  # 16 conversations / 8 x 3 epochs
    losses = [[entry["loss"] for entry in state["log_history"] if "loss" in entry] for state in states]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_predictions_have_one_line_per_utterance_in_order(runs):
    expected = [(line["conversation_id"], line["turn"]) for line in
                map(json.loads, (runs["corpus"] / "test.jsonl").read_text().splitlines())]
    for name in ("one", "two"):
        lines = [json.loads(line) for line in (runs[name] / "predictions_test.jsonl").read_text().splitlines()]
        assert [(line["conversation_id"], line["turn"]) for line in lines] == expected
    labels = [[json.loads(line)["label"] for line in (runs[name] / "predictions_test.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert labels[0] == labels[1]


def test_only_the_main_process_writes_the_run_folder(runs):
    folder = runs["folder"]
    for name in ("two", "resumed"):
        main = (folder / f"{name}.writes.0").read_text().split()
        assert any(path.endswith("model.safetensors") for path in main)
        assert any(path.endswith("README.md") for path in main)
        others = folder / f"{name}.writes.1"
        # a checkpoint keeps each process's random state (to resume it exactly): the one file the others write
        written = [path for path in (others.read_text().split() if others.exists() else [])
                   if not (os.path.basename(path) == "rng_state_1.pth" and "/checkpoint-" in path)]
        assert not written, written[:20]
    for name in ("one", "two"):
        assert (runs[name] / "README.md").exists() and (runs[name] / "model.safetensors").exists()


def test_a_two_process_checkpoint_resumes_in_two_processes(runs):
    two, resumed = results(runs["two"]), results(runs["resumed"])
    assert resumed["resumed_from_checkpoint"] == "checkpoint-2"
    assert resumed["train_loss"] == pytest.approx(two["train_loss"], rel=1e-5)
    for key in ("eval_weighted_f1", "test_weighted_f1", "test_accuracy", "test_gate_text"):
        assert resumed[key] == pytest.approx(two[key], abs=1e-5), key


def test_accelerate_launch_trains_like_torchrun(runs):
    two, accelerate = results(runs["two"]), results(runs["accelerate"])
    assert accelerate["num_processes"] == 2 and len(accelerate["utterances_embedded_per_rank"]) == 2
    assert accelerate["train_loss"] == pytest.approx(two["train_loss"], rel=1e-5)
    assert accelerate["test_weighted_f1"] == pytest.approx(two["test_weighted_f1"], abs=1e-5)


def test_bf16_lora_finetuning_with_gradient_checkpointing_in_two_processes(runs):
    mixed = results(runs["mixed"])
    assert mixed["num_processes"] == 2 and mixed["train_loss"] > 0  # finite: strict JSON has no NaN
    lines = (runs["mixed"] / "predictions_test.jsonl").read_text().splitlines()
    assert len(lines) == len((runs["corpus"] / "test.jsonl").read_text().splitlines())
    for modality in ("speech", "text"):
        assert (runs["mixed"] / f"finetuning-{modality}").is_dir()


def test_a_two_process_checkpoint_is_not_resumed_in_one_process(runs, tiny_backbones, tmp_path):
    """Another number of processes trains on other global batches: the resumed run would silently differ."""
    args = common_args(tiny_backbones, runs["corpus"], tmp_path / "run", tmp_path / "cache")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "run_erc.py"), *map(str, args),
                             "--resume_from_checkpoint", str(runs["two"] / "checkpoint-2")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "number of processes 2 → 1" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
