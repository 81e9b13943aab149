"""Nested, speaker-independent choice between EmoDB recipes: an accuracy for the choice that never sees the test
speakers.

    python benchmarks/emodb_selection.py                # CANDIDATES below, seed 42, 5 outer x 4 inner folds
    python benchmarks/emodb_selection.py --quick        # one outer fold, 2 epochs: checks the script runs
    python benchmarks/emodb_selection.py --tag p128 --candidates '{"projection 128": {...}}'   # one more candidate
    python benchmarks/emodb_selection.py --render results/emodb_selection-a.json results/emodb_selection-b.json
                                                        # the choice between all their candidates (no training)

EmoDB has no speakers to spare for a validation set, so comparing recipes on the 5 test folds (as `accuracy.py
--recipe` does) picks the one that happens to suit those speakers. Here, for each outer fold (test: one speaker
pair), every candidate recipe is scored by inner cross-validation over the 4 training pairs (train on 3, test on
the 4th); the candidate with the best inner mean is the one chosen for that fold, and its accuracy on the outer
test pair is what counts. Each candidate's outer accuracy is reported too, for comparison. A candidate's scores do
not depend on the others, so candidates can be run separately (`--tag`, in parallel or on other machines) and
chosen between afterwards (`--render` with all their JSON files, which must share the seed, folds and training).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets.utils.logging import disable_progress_bar
from transformers.utils import logging

from mister_e_hf.data.emodb import speaker_folds

from accuracy import RECIPES, emodb_folds, train_and_test
from common import REPO_ROOT, add_asset_args, main_guard


RESULTS = REPO_ROOT / "benchmarks" / "results"

STANDARDISED = {"speech_layers": "concat", "text_layers": "concat", "standardize_embeddings": True, "supcon_weight": 0.0}
CANDIDATES = {  # config changes on top of the backbones; training is RECIPES["emodb"]["training"] for all
    "weighted layers": {"speech_layers": "weighted", "text_layers": "weighted", "standardize_embeddings": False},
    "standardised, concatenated layers, no contrastive loss": STANDARDISED,
    "standardised, concatenated layers, no contrastive loss, dropout 0.4": {**STANDARDISED, "dropout": 0.4},
    "standardised, concatenated layers, no contrastive loss, projection 128": {**STANDARDISED, "projection_dim": 128},
}
"""Every recipe tried for EmoDB through this protocol. The committed emodb_selection.json was run as three runs,
merged by `--render` (each file's meta holds its candidates): the first two candidates (the default of that time),
then `--tag dropout04` and `--tag projection128` with the third and fourth as `--candidates`."""


def speaker_of(dataset) -> list[str]:
    return [speakers[0] for speakers in dataset["speaker"]]


def inner_splits(train, num_folds: int):
    """(train, test) datasets of the inner folds: the training speakers, sorted, in `num_folds` groups."""
    speakers = speaker_of(train)
    for group in speaker_folds(speakers, num_folds):
        held_out = [i for i, s in enumerate(speakers) if s in group]
        kept = [i for i, s in enumerate(speakers) if s not in group]
        yield group, {"train": train.select(kept), "test": train.select(held_out)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_asset_args(parser, "whisper", "minilm", "emodb")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache_dir", default=None, help="embedding cache (default: the package default)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--candidates", type=json.loads, default=CANDIDATES, metavar="JSON",
                        help="{name: {config changes}} to choose between (default: CANDIDATES)")
    parser.add_argument("--tag", default=None, help="write emodb_selection-TAG.json/.md")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help="no training: rewrite the markdown of an earlier run's JSON, or, given several, choose "
                             "between all their candidates and write emodb_selection[-TAG].json/.md")
    args = parser.parse_args()
    if args.render is not None:
        saved = [json.loads(path.read_text()) for path in args.render]
        if len(saved) == 1:
            path = args.render[0]
        else:
            saved = [merge(saved, args.render, parser)]
            path = output_path(args.tag, saved[0]["meta"]["quick"])
            path.write_text(json.dumps(saved[0], indent=1) + "\n")
        path.with_suffix(".md").write_text(render(saved[0]["meta"], saved[0]["folds"]))
        print(path.with_suffix(".md").read_text())
        return
    candidates = args.candidates
    logging.set_verbosity_error()
    disable_progress_bar()
    training = {**RECIPES["emodb"]["training"], **({"num_train_epochs": 2} if args.quick else {})}
    start = time.perf_counter()
    folds = []
    for fold, base, datasets in emodb_folds(args, [0] if args.quick else range(5)):
        record = {"fold": fold, "test_speakers": sorted(set(speaker_of(datasets["test"]))), "inner": {}, "outer": {}}
        for name, overrides in candidates.items():
            scores = []
            for group, splits in inner_splits(datasets["train"], 2 if args.quick else 4):
                with tempfile.TemporaryDirectory() as workdir:
                    scores.append(train_and_test(base, overrides, ["speech", "text"], splits, training, args.seed,
                                                 False, workdir)["accuracy"])
                print(f"fold {fold} | {name} | inner test speakers {group} | {scores[-1]:.4f}", flush=True)
            record["inner"][name] = scores
            with tempfile.TemporaryDirectory() as workdir:
                record["outer"][name] = train_and_test(base, overrides, ["speech", "text"], datasets, training,
                                                       args.seed, False, workdir)["accuracy"]
            print(f"fold {fold} | {name} | outer {record['outer'][name]:.4f}", flush=True)
        folds.append(choose(record))

    meta = {"seed": args.seed, "quick": args.quick, "seconds": round(time.perf_counter() - start, 1),
            "candidates": candidates, "training": training, "torch": torch.__version__,
            "python": sys.version.split()[0]}
    path = output_path(args.tag, args.quick)
    path.write_text(json.dumps({"meta": meta, "folds": folds}, indent=1) + "\n")
    markdown = render(meta, folds)
    path.with_suffix(".md").write_text(markdown)
    print(markdown)


def output_path(tag: str | None, quick: bool) -> Path:
    return RESULTS / f"emodb_selection{f'-{tag}' if tag else ''}{'-quick' if quick else ''}.json"


def choose(record: dict) -> dict:
    """Sets an outer fold's `chosen` candidate (best inner mean) and its outer accuracy."""
    record["chosen"] = max(record["inner"], key=lambda name: statistics.mean(record["inner"][name]))
    record["chosen_accuracy"] = record["outer"][record["chosen"]]
    return record


def merge(runs: list[dict], paths: list[Path], parser) -> dict:
    """One run holding the candidates of several, which must agree on everything but their candidates."""
    shared = ("seed", "quick", "training")
    first = runs[0]
    for run, path in zip(runs[1:], paths[1:]):
        differs = [key for key in shared if run["meta"][key] != first["meta"][key]]
        if [(r["fold"], r["test_speakers"]) for r in run["folds"]] != [(r["fold"], r["test_speakers"]) for r in first["folds"]]:
            differs.append("folds")
        if differs:
            parser.error(f"--render: {path} differs from {paths[0]} in {differs}; only runs that share the seed, "
                         "folds and training can be chosen between.")
    candidates: dict = {}
    for run, path in zip(runs, paths):
        for name, overrides in run["meta"]["candidates"].items():
            if name in candidates:
                parser.error(f"--render: candidate {name!r} is in more than one file ({path}); give each once.")
            candidates[name] = overrides
    folds = [choose({**records[0], "inner": {n: s for r in records for n, s in r["inner"].items()},
                     "outer": {n: s for r in records for n, s in r["outer"].items()}})
             for records in zip(*(run["folds"] for run in runs))]
    meta = {**{key: first["meta"][key] for key in shared}, "candidates": candidates,
            "merged_from": [{"file": path.name, **run["meta"]} for run, path in zip(runs, paths)]}
    return {"meta": meta, "folds": folds}


def render(meta: dict, folds: list[dict]) -> str:
    """The markdown table of a run: per outer fold, each candidate's inner mean and outer accuracy, and the choice."""
    candidates = list(meta["candidates"])
    lines = ["# EmoDB: nested speaker-independent choice between recipes", "",
             f"Seed {meta['seed']}; each outer fold's candidates scored by inner cross-validation over its training "
             "speaker pairs; accuracy on the outer test pair.", "",
             *([f"Candidates run separately and chosen between together: "
                + "; ".join(f"`{m['file']}` ({', '.join(m['candidates'])}; {m['seconds']:.0f} s)" for m in meta["merged_from"])
                + ".", ""] if "merged_from" in meta else []),
             "| outer fold (test speakers) | " + " | ".join(f"{n}: inner mean / outer" for n in candidates)
             + " | chosen |", "|---|" + "---|" * (len(candidates) + 1)]
    for r in folds:
        cells = [f"{100 * statistics.mean(r['inner'][n]):.1f} / {100 * r['outer'][n]:.1f}" for n in candidates]
        lines.append(f"| {r['fold']} ({', '.join(r['test_speakers'])}) | " + " | ".join(cells) + f" | {r['chosen']} |")
    lines += ["", f"- nested accuracy (the candidate chosen per fold, on its outer pair): "
                  f"**{100 * statistics.mean(r['chosen_accuracy'] for r in folds):.1f}**"]
    for name in candidates:
        inner = [score for r in folds for score in r["inner"][name]]
        lines.append(f"- {name}: outer {100 * statistics.mean(r['outer'][name] for r in folds):.1f}; inner "
                     f"{100 * statistics.mean(inner):.1f} over all {len(inner)} inner folds")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main_guard(main)
