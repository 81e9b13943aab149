#!/usr/bin/env python
"""What backbone fine-tuning buys on MELD (text, MiniLM-L6): `examples/run_erc.py` with the frozen backbone (README's
former `make train` recipe: weighted layers, dropout 0.4, lr 3e-4), with `--backbone_finetuning full` and with `--backbone_finetuning lora` (utterance-level
fine-tuning on the training labels first, then the cached head as usual), same recipe and seed. Test weighted F1,
wall seconds per fine-tuning epoch, whole-run wall time and each run's peak RSS (its own process).

    python benchmarks/finetuning.py                          # 1 fine-tuning epoch, seed 42
    python benchmarks/finetuning.py --finetuning-epochs 2
    python benchmarks/finetuning.py --quick                  # 60 conversations per split
"""

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from common import (REPO_ROOT, add_asset_args, base_parser, main_guard, meld_dir, minilm_path, run_in_child, setup,
                    write_results)


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    add_asset_args(parser, "minilm", "meld")
    parser.add_argument("--methods", default="none,full,lora", help="Comma-separated --backbone_finetuning values.")
    parser.add_argument("--finetuning-epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def run_erc(argv: list[str]) -> dict:
    """examples/run_erc.py in this (child) process; returns its all_results.json and the wall seconds."""
    import runpy
    import sys

    sys.argv = ["run_erc.py", *argv]
    start = time.perf_counter()
    try:
        runpy.run_path(str(REPO_ROOT / "examples" / "run_erc.py"), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"run_erc.py exited with {exit_.code}") from None
    seconds = time.perf_counter() - start
    output = Path(argv[argv.index("--output_dir") + 1])
    return {"results": json.loads((output / "all_results.json").read_text()), "seconds": seconds}


def main():
    args = parse_args()
    setup(args)
    methods = args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="mister-e-finetuning-"))
    common = ["--dataset", "meld", "--data_dir", str(meld_dir(args)), "--text_model_name_or_path",
              str(minilm_path(args)), "--freeze_backbones", "--config_overrides", "text_layers=weighted,dropout=0.4,standardize_embeddings=false",
              "--learning_rate", "3e-4", "--seed", str(args.seed), "--disable_tqdm", "true",
              "--embedding_cache_dir", str(work / "cache"), "--save_strategy", "epoch", "--save_total_limit", "1"]
    if args.quick:
        common += ["--max_train_samples", "60", "--max_eval_samples", "20", "--max_test_samples", "20",
                   "--num_train_epochs", "2"]
    results = {}
    for method in methods:
        argv = [*common, "--output_dir", str(work / method)]
        if method != "none":
            argv += ["--backbone_finetuning", method, "--finetuning_epochs", str(args.finetuning_epochs)]
        run, peak = run_in_child(run_erc, argv)
        measured = run["results"]
        results[method] = {
            "test_weighted_f1": measured["test_weighted_f1"], "eval_weighted_f1": measured.get("eval_weighted_f1"),
            "run_seconds": round(run["seconds"], 1), "peak_rss_mib": round(peak / 2**20),
            "finetuning_seconds_per_epoch": round(measured["finetuning_text_train_runtime"]
                                                  / measured["finetuning_text_epoch"], 1)
            if "finetuning_text_train_runtime" in measured else None,
            "finetuning_train_loss": measured.get("finetuning_text_train_loss"),
        }
        print(method, results[method], flush=True)
    names = {"none": "frozen", "full": "full fine-tuning", "lora": "LoRA (r 8, alpha 16)"}
    rows = [[names.get(m, m), f"{100 * r['test_weighted_f1']:.1f}",
             "" if r["eval_weighted_f1"] is None else f"{100 * r['eval_weighted_f1']:.1f}",
             "" if r["finetuning_seconds_per_epoch"] is None else f"{r['finetuning_seconds_per_epoch']:.0f}",
             f"{r['run_seconds']:.0f}", f"{r['peak_rss_mib']}"] for m, r in results.items()]
    notes = [f"MELD official splits, text only, MiniLM-L6; the head trained as the former `make train` did (every layer weighted, "
             f"dropout 0.4, lr 3e-4, model picked on dev), seed {args.seed}; fine-tuning: {args.finetuning_epochs:g} "
             "epoch(s) of utterance classification at lr 2e-5 (run_erc's defaults), then the cached head.",
             "One seed: differences under about one point are within the seed-to-seed spread of the frozen recipe "
             "(61.0 ± 0.4 over seeds 42, 1, 2)."]
    write_results(args, "finetuning", "Backbone fine-tuning on MELD (MiniLM-L6)",
                  results, [("Test weighted F1, time and memory",
                             ["backbone", "test wF1", "dev wF1", "s / fine-tuning epoch", "run s", "peak RSS MiB"],
                             rows)], notes)


if __name__ == "__main__":
    main_guard(main)
