#!/usr/bin/env python
"""Whisper on the frames that cover each utterance (`speech_trim_padding=True`) against its padded 30-s window, on
EmoDB with the accuracy table's protocol and recipe (Whisper tiny.en + MiniLM-L6 frozen, every layer weighted; 5
speaker-pair folds, 3 seeds): extraction seconds of every clip into an empty cache, and test accuracy of MiSTER-E
and of the speech logistic-regression reference, per (seed, fold), with a paired test of the difference.

    python benchmarks/whisper_trimming.py            # 5 folds x seeds 42, 1, 2
    python benchmarks/whisper_trimming.py --quick    # 1 fold, 1 seed, 2 epochs
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import accuracy
from common import REPO_ROOT, add_asset_args, emodb_dir, hardware_info, main_guard, minilm_path, whisper_path
from datasets.utils.logging import disable_progress_bar
from scipy import stats as scipy_stats
from transformers.utils import logging

from mister_e_hf import MisterEModel, MisterEProcessor
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.data import load_corpus

RESULTS = REPO_ROOT / "benchmarks" / "results"


def run_variant(args, trim: bool, seeds: list[int], folds: list[int], cache_dir: str) -> dict:
    whisper, minilm = str(whisper_path(args)), str(minilm_path(args))
    recipe = accuracy.RECIPES["emodb"]
    training = {**recipe["training"], **({"num_train_epochs": 2} if args.quick else {})}
    base = processor = None
    extraction_seconds, embedded = 0.0, 0
    runs, references = [], []
    for fold in folds:
        datasets, _ = load_corpus("emodb", data_dir=emodb_dir(args), fold=fold, validation=False)
        if base is None:
            labels = datasets["train"].features["labels"].feature.names
            base = MisterEModel.from_backbones(whisper, minilm, freeze_speech_backbone=True, freeze_text_backbone=True,
                                               id2label=dict(enumerate(labels)),
                                               **{**accuracy.MEASURED_WITH, **recipe["config"], "speech_trim_padding": trim})
            processor = MisterEProcessor.from_backbones(whisper, minilm)
        start = time.perf_counter()
        datasets, cache_stats = add_cached_embeddings(base, processor, datasets, cache_dir)
        extraction_seconds += cache_stats.extraction_seconds
        embedded += cache_stats.utterances_embedded
        print(f"{'trimmed' if trim else 'padded'} | fold {fold} | embedded {cache_stats.utterances_embedded} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        references.append({"fold": fold, **accuracy.logistic_regression(datasets["train"], datasets["test"],
                                                                       ["speech"], "all")})
        for seed in seeds:
            with tempfile.TemporaryDirectory() as workdir:
                result = accuracy.train_and_test(base, {}, ["speech", "text"], datasets, training, seed, False, workdir)
            runs.append({"fold": fold, "seed": seed, **result})
            print(f"{'trimmed' if trim else 'padded'} | fold {fold} | seed {seed} | {result}", flush=True)
    return {"runs": runs, "logistic_regression": references, "extraction_seconds": round(extraction_seconds, 2),
            "utterances_embedded": embedded}


def per_seed(runs: list[dict], key: str = "accuracy") -> list[float]:
    """Each seed's mean over the folds (the table's protocol)."""
    seeds = sorted({r["seed"] for r in runs})
    return [statistics.mean(r[key] for r in runs if r["seed"] == s) for s in seeds]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_asset_args(parser, "whisper", "minilm", "emodb")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recipe", type=json.loads, default={}, metavar="JSON",
                        help='changes to the EmoDB recipe, e.g. \'{"config": {"standardize_embeddings": true}}\'')
    parser.add_argument("--tag", default=None, help="write whisper_trimming-TAG.json/.md")
    args = parser.parse_args()
    for part, values in args.recipe.items():
        if part not in ("config", "training"):
            parser.error(f"--recipe: unknown key {part!r}; expected config and/or training")
        accuracy.RECIPES["emodb"][part] = {**accuracy.RECIPES["emodb"][part], **values}
    logging.set_verbosity_error()
    disable_progress_bar()
    seeds, folds = (args.seeds[:1], [0]) if args.quick else (args.seeds, list(range(5)))
    start = time.perf_counter()
    variants = {}
    for name, trim in (("padded", False), ("trimmed", True)):
        with tempfile.TemporaryDirectory() as cache_dir:  # an empty cache: every clip is extracted and timed
            variants[name] = run_variant(args, trim, seeds, folds, cache_dir)

    padded, trimmed = variants["padded"], variants["trimmed"]
    pairs = [(p["accuracy"], t["accuracy"]) for p, t in zip(padded["runs"], trimmed["runs"])]
    assert all((p["fold"], p["seed"]) == (t["fold"], t["seed"]) for p, t in zip(padded["runs"], trimmed["runs"]))
    differences = [t - p for p, t in pairs]
    test = scipy_stats.ttest_rel([t for _, t in pairs], [p for p, _ in pairs]) if len(pairs) > 1 else None
    summary = {
        name: {"accuracy_per_seed": per_seed(v["runs"]),
               "accuracy": statistics.mean(per_seed(v["runs"])),
               "accuracy_std": statistics.stdev(per_seed(v["runs"])) if len(seeds) > 1 else 0.0,
               "logistic_regression_accuracy": statistics.mean(r["accuracy"] for r in v["logistic_regression"]),
               "extraction_seconds": v["extraction_seconds"], "utterances_embedded": v["utterances_embedded"]}
        for name, v in variants.items()}
    summary["difference"] = {
        "mean_points": 100 * statistics.mean(differences),
        "std_points": 100 * statistics.stdev(differences) if len(differences) > 1 else 0.0,
        "pairs": len(differences),
        "paired_t_p_value": None if test is None else float(test.pvalue),
        "extraction_speedup": padded["extraction_seconds"] / trimmed["extraction_seconds"],
    }
    within_noise = test is not None and test.pvalue > 0.05
    meta = {"seconds": round(time.perf_counter() - start, 1), "quick": args.quick, "seeds": seeds, "folds": folds,
            "recipe": accuracy.RECIPES["emodb"], "hardware": hardware_info()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    (RESULTS / f"whisper_trimming{suffix}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "variants": variants}, indent=1) + "\n")
    d = summary["difference"]
    lines = [
        "# Whisper on the utterance's frames vs its 30-s window (EmoDB)", "",
        f"Whisper tiny.en + MiniLM-L6 frozen, the accuracy table's EmoDB recipe ({json.dumps(accuracy.RECIPES['emodb'])}); "
        f"{len(folds)} speaker-pair fold(s) x seeds {seeds}; {meta['seconds']:.0f} s in all. "
        f"{meta['hardware'].get('cpu', '')}".rstrip(), "",
        "| speech input | MiSTER-E accuracy (mean ± std over seeds) | logistic regression, speech, all layers | "
        "extraction of every clip |",
        "|---|---|---|---|",
    ]
    for name in ("padded", "trimmed"):
        s = summary[name]
        lines.append(f"| {name} | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} | "
                     f"{100 * s['logistic_regression_accuracy']:.1f} | {s['extraction_seconds']:.1f} s "
                     f"({s['utterances_embedded']} embeddings) |")
    p_value = "n/a" if d["paired_t_p_value"] is None else f"{d['paired_t_p_value']:.3f}"
    lines += ["", f"Trimmed - padded, per (seed, fold) pair: {d['mean_points']:+.2f} ± {d['std_points']:.2f} points "
              f"over {d['pairs']} pairs; paired t-test p = {p_value} "
              f"({'within noise' if within_noise else 'not within noise at p > 0.05'}). "
              f"Extraction {d['extraction_speedup']:.1f}x faster (the processor's feature extraction included; text "
              "embeddings are few, EmoDB having ten sentences)."]
    (RESULTS / f"whisper_trimming{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    main_guard(main)
