#!/usr/bin/env python
"""1 vs 2 processes (`torchrun`, gloo on CPUs, each process pinned to its own core, one thread each) running
`examples/run_erc.py` end to end on MELD text with a frozen MiniLM-L6: embedding extraction into an empty cache,
then head training, evaluation and prediction. Utterances per second of extraction (distinct utterances embedded /
wall seconds of the embedding stage) and of head training (training utterances x epochs / train runtime), and the
ratio 2 / 1 of each, from runs interleaved in one invocation; also the per-rank extraction counts and whether the
two runs' metrics agree (same global batch).

    python benchmarks/distributed.py            # 296 training conversations, 3 repeats
    python benchmarks/distributed.py --quick    # 40 conversations, 1 repeat
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, add_asset_args, base_parser, main_guard, meld_dir, minilm_path, setup, write_results

# Pins each process to the core of its local rank, then runs run_erc.py in it.
PINNED = """import os, runpy, sys
os.sched_setaffinity(0, {int(os.environ.get("LOCAL_RANK", "0")) % os.cpu_count()})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    add_asset_args(parser, "minilm", "meld")
    parser.add_argument("--conversations", type=int, default=None,
                        help="MELD training conversations (default 296, a multiple of the global batch; 40 quick).")
    parser.add_argument("--epochs", type=float, default=None, help="Head-training epochs (default 3; 1 quick).")
    parser.add_argument("--global-batch", type=int, default=8, help="Conversations per optimiser step, all processes.")
    return parser.parse_args()


def run(args, processes: int, folder: Path, pinned: Path) -> dict:
    out = folder / f"run-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(folder / f"cache-{processes}", ignore_errors=True)  # an empty cache: extraction is measured
    conversations = args.conversations or (40 if args.quick else 296)
    evaluation = max(conversations // 6, 4)
    command = [
        str(REPO_ROOT / "examples" / "run_erc.py"), "--dataset", "meld", "--data_dir", str(meld_dir(args)),
        "--text_model_name_or_path", str(minilm_path(args)), "--freeze_backbones",
        "--config_overrides", "text_layers=weighted,dropout=0.0,standardize_embeddings=false", "--learning_rate", "3e-4",
        "--max_train_samples", str(conversations), "--max_eval_samples", str(evaluation),
        "--max_test_samples", str(evaluation), "--num_train_epochs", str(args.epochs or (1 if args.quick else 3)),
        "--per_device_train_batch_size", str(args.global_batch // processes), "--save_strategy", "no",
        "--eval_strategy", "no", "--do_train", "--do_eval", "--do_predict", "--disable_tqdm", "true",
        "--output_dir", str(out), "--embedding_cache_dir", str(folder / f"cache-{processes}"),
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([*launcher, str(pinned), *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"run_erc.py in {processes} processes failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return {"metrics": json.loads((out / "all_results.json").read_text())}


def main():
    args = parse_args()
    setup(args)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("This benchmark pins 2 processes to 2 cores; this machine has fewer.")
    repeats = args.repeats or (1 if args.quick else 2)
    folder = Path(tempfile.mkdtemp(prefix="mister-e-distributed-"))
    pinned = folder / "pinned.py"
    pinned.write_text(PINNED)
    measured = {1: [], 2: []}
    try:
        for _ in range(repeats):
            for processes in (1, 2):  # interleaved, so both see the same machine state
                measured[processes].append(run(args, processes, folder, pinned))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    results = {}
    for processes, runs in measured.items():
        metrics = [r["metrics"] for r in runs]
        utterances = metrics[0]["train_utterances"]
        epochs = metrics[0]["epoch"]
        results[processes] = {
            "extraction_utterances_per_second": statistics.median(
                m["utterances_embedded"] / m["embedding_seconds"] for m in metrics),
            "training_utterances_per_second": statistics.median(
                utterances * epochs / m["train_runtime"] for m in metrics),
            "utterances_embedded": metrics[0]["utterances_embedded"],
            "utterances_embedded_per_rank": metrics[0].get("utterances_embedded_per_rank",
                                                           [metrics[0]["utterances_embedded"]]),
            "train_loss": metrics[0]["train_loss"],
            "eval_weighted_f1": metrics[0]["eval_weighted_f1"],
            "test_weighted_f1": metrics[0]["test_weighted_f1"],
            "training_utterances": utterances,
            "repeats": len(metrics),
        }
    one, two = results[1], results[2]
    ratios = {name: two[name] / one[name] for name in
              ("extraction_utterances_per_second", "training_utterances_per_second")}
    agree = {name: abs(two[name] - one[name]) for name in ("train_loss", "eval_weighted_f1", "test_weighted_f1")}
    rows = [[f"{p} process{'es' if p > 1 else ''}", f"{r['extraction_utterances_per_second']:.1f}",
             f"{r['training_utterances_per_second']:.1f}", "/".join(map(str, r["utterances_embedded_per_rank"])),
             f"{r['train_loss']:.6f}", f"{100 * r['test_weighted_f1']:.2f}"] for p, r in results.items()]
    rows.append(["ratio 2 / 1", f"{ratios['extraction_utterances_per_second']:.2f}x",
                 f"{ratios['training_utterances_per_second']:.2f}x", "", "", ""])
    notes = [
        f"MELD text, frozen MiniLM-L6, {one['training_utterances']} training utterances, global batch "
        f"{args.global_batch} conversations, dropout 0 (so that the runs are comparable); medians of {repeats} "
        "interleaved repeats, each process pinned to one core with one thread.",
        "Extraction: distinct utterances embedded / wall seconds of the embedding stage (model loading excluded). "
        "Training: training utterances x epochs / Trainer's train_runtime. The fixed per-step cost of DDP on gloo "
        "(a gradient all-reduce and the loss inputs' all-gather per step) is large next to this small head, so "
        "head training gains less than extraction.",
        "The training split is a multiple of the global batch: otherwise accelerate fills the last training batch "
        "of an epoch with repeated conversations, and the two runs differ by those.",
        f"1 vs 2 processes differ by {agree['train_loss']:.2e} in train_loss and "
        f"{agree['test_weighted_f1']:.2e} in test weighted F1.",
    ]
    write_results(args, "distributed", "1 vs 2 processes: extraction and head training",
                  {"by_processes": results, "ratios": ratios, "differences": agree},
                  [("Throughput (utterances / s)", ["run", "extraction", "head training", "embedded per rank",
                                                    "train_loss", "test wF1"], rows)], notes)


if __name__ == "__main__":
    main_guard(main)
