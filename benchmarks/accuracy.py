"""Accuracy of MiSTER-E and its ablations on real data, mean ± std over seeds, beside simple baselines.

    python benchmarks/accuracy.py                 # MELD (text, frozen MiniLM) and EmoDB (Whisper tiny.en + MiniLM)
    python benchmarks/accuracy.py --quick         # one seed, one EmoDB fold, few epochs: checks the script runs
    python benchmarks/accuracy.py --datasets emodb --systems MiSTER-E --tag concat \
        --recipe '{"emodb": {"config": {"speech_layers": "concat"}}}'   # a recipe variant, same protocol

MELD: official splits, model picked on dev each run, test weighted F1. EmoDB: 5 speaker-independent folds (speaker
pairs), trained on the 8 other speakers for a fixed number of epochs, mean test accuracy over folds. Both use the
table's recipes (`RECIPES`: layer-weighted backbone embeddings, cached once; README's MELD command). Rows:

- logistic regression on the utterance embeddings alone (no context, no gate): last layer, and all layers concatenated;
- single-modality MiSTER-E (text only, speech only): one expert, no gate;
- full MiSTER-E, and ablations: no contrastive loss, no KL term, no gate (mean of experts), no context layer;
- the two sibling fusions in place of MiSTER-E's: guided gated fusion with distillation, FiLM mixture of experts.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets.utils.logging import disable_progress_bar
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers.utils import logging

from mister_e_hf import MisterEConfig, MisterEModel, MisterEProcessor
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.data import load_corpus
from mister_e_hf.evaluation import build_trainer, evaluate_split

from common import (REPO_ROOT, add_asset_args, emodb_dir, head_training_arguments, main_guard, meld_dir, minilm_path,
                    whisper_path)


RESULTS = REPO_ROOT / "benchmarks" / "results"

VARIANTS = {
    "MiSTER-E": {},
    "no contrastive loss": {"supcon_weight": 0.0},
    "no KL term": {"kl_weight": 0.0},
    "no gate (mean of experts)": {"gate_type": "mean"},
    "no context layer": {"context_layer": "none"},
    "guided gated fusion (Zhao et al.)": {"fusion": "guided-gated"},
    "FiLM mixture of experts (MSF-SER)": {"fusion": "film-moe"},
}
RECIPES = {  # the committed table's (README's EmoDB command standardises instead: see README)
    "meld": {"config": {"text_layers": "weighted", "dropout": 0.4},
             "training": {"learning_rate": 3e-4, "num_train_epochs": 20}},
    "emodb": {"config": {"speech_layers": "weighted", "text_layers": "weighted"},
              "training": {"learning_rate": 1e-3, "num_train_epochs": 20}},
}


def labelled(dataset, modality: str):
    """(embeddings `(N, layers, dim)`, labels) of the labelled utterances that have `modality`."""
    x, y = [], []
    for embeds, present, labels in zip(dataset[f"{modality}_embeds"], dataset[f"{modality}_present"], dataset["labels"]):
        for e, p, label in zip(embeds, present, labels):
            if p and label != -1:
                x.append(e)
                y.append(label)
    return np.asarray(x, dtype=np.float32), np.asarray(y)


def logistic_regression(train, test, modalities, layers: str) -> dict:
    features = {}
    for split, dataset in (("train", train), ("test", test)):
        parts, y = [], None
        for modality in modalities:
            x, y = labelled(dataset, modality)
            parts.append(x[:, -1] if layers == "last" else x.reshape(len(x), -1))
        features[split] = (np.concatenate(parts, axis=1), y)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    classifier.fit(*features["train"])
    predicted = classifier.predict(features["test"][0])
    true = features["test"][1]
    return {"accuracy": accuracy_score(true, predicted), "weighted_f1": f1_score(true, predicted, average="weighted")}


MEASURED_WITH = {"dropout": 0.2, "supcon_weight": 0.5, "speech_trim_padding": False}
"""MisterEConfig's defaults of these fields when the committed results were measured, before benchmarks/defaults.py
chose new ones: every base model of the benchmarks is built on them (then its recipe, then a variant's changes), so
that their results regenerate."""


def train_and_test(base, config_overrides, modalities, datasets, training, seed, select_on_validation, workdir):
    config = MisterEConfig.from_dict({**base.config.to_dict(), **config_overrides,
                                      **({} if "speech" in modalities else {"speech_config": None}),
                                      **({} if "text" in modalities else {"text_config": None})})
    torch.manual_seed(seed)
    model = MisterEModel(config, speech_backbone=base.speech_backbone if "speech" in modalities else None,
                         text_backbone=base.text_backbone if "text" in modalities else None)
    drop = [c for m in ("speech", "text") if m not in modalities for c in (f"{m}_embeds", f"{m}_present")]
    splits = {k: v.remove_columns([c for c in drop if c in v.column_names]) for k, v in datasets.items()}
    selection = dict(eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
                     metric_for_best_model="weighted_f1") if select_on_validation else {}
    args = head_training_arguments(str(workdir), seed=seed, **selection, **training)
    trainer = build_trainer(model, args, splits["train"], splits.get("validation"))  # run_erc's trainer
    trainer.train()
    metrics = evaluate_split(trainer, splits["test"], "test")  # run_erc's evaluation
    result = {"accuracy": metrics["test_accuracy"], "weighted_f1": metrics["test_weighted_f1"],
              **{k[5:]: v for k, v in metrics.items() if k.startswith("test_gate_")}}
    if select_on_validation:  # the selected model's score on the split it was selected on
        result["validation_weighted_f1"] = evaluate_split(trainer, splits["validation"], "eval")["eval_weighted_f1"]
    return result


def meld(args, seeds):
    recipe = RECIPES["meld"]
    datasets, _ = load_corpus("meld", data_dir=meld_dir(args))
    if args.quick:
        datasets = {k: v.select(range(min(len(v), 60))) for k, v in datasets.items()}
    labels = datasets["train"].features["labels"].feature.names
    minilm = str(minilm_path(args))
    base = MisterEModel.from_backbones(None, minilm, freeze_text_backbone=True, id2label=dict(enumerate(labels)),
                                       **{**MEASURED_WITH, **recipe["config"]})
    processor = MisterEProcessor.from_backbones(None, minilm)
    datasets, _ = add_cached_embeddings(base, processor, datasets, args.cache_dir)
    rows = {
        "logistic regression, last layer": [logistic_regression(datasets["train"], datasets["test"], ["text"], "last")],
        "logistic regression, all layers": [logistic_regression(datasets["train"], datasets["test"], ["text"], "all")],
    }
    training = {**recipe["training"], **({"num_train_epochs": 2} if args.quick else {})}
    for name, overrides in (("text only", {}),
                            *((n, VARIANTS[n]) for n in ("no context layer", "guided gated fusion (Zhao et al.)",
                                                         "FiLM mixture of experts (MSF-SER)"))):
        if args.systems and name not in args.systems:
            continue
        rows[name] = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as workdir:
                rows[name].append(train_and_test(base, overrides, ["text"], datasets, training, seed, True, workdir))
            print(f"meld | {name} | seed {seed} | {rows[name][-1]}", flush=True)
    return rows


def emodb_folds(args, folds):
    """`(fold, base model, datasets with cached embeddings)` per EmoDB fold (no validation split); the base model
    (frozen Whisper tiny.en + MiniLM, `RECIPES["emodb"]["config"]`) is built once."""
    whisper, minilm = str(whisper_path(args)), str(minilm_path(args))
    base = processor = None
    for fold in folds:
        datasets, _ = load_corpus("emodb", data_dir=emodb_dir(args), fold=fold, validation=False)
        if base is None:
            labels = datasets["train"].features["labels"].feature.names
            base = MisterEModel.from_backbones(
                whisper, minilm, freeze_speech_backbone=True,
                freeze_text_backbone=True, id2label=dict(enumerate(labels)),
                **{**MEASURED_WITH, **RECIPES["emodb"]["config"]})
            processor = MisterEProcessor.from_backbones(whisper, minilm)
        datasets, _ = add_cached_embeddings(base, processor, datasets, args.cache_dir)
        yield fold, base, datasets


def emodb(args, seeds):
    recipe = RECIPES["emodb"]
    rows: dict[str, list] = {}
    for fold, base, datasets in emodb_folds(args, [0] if args.quick else range(5)):
        for name, modalities in (("logistic regression, speech, all layers", ["speech"]),
                                 ("logistic regression, text, all layers", ["text"]),
                                 ("logistic regression, speech + text, all layers", ["speech", "text"])):
            rows.setdefault(name, []).append(
                logistic_regression(datasets["train"], datasets["test"], modalities, "all"))
        training = {**recipe["training"], **({"num_train_epochs": 2} if args.quick else {})}
        variants = {"text only": (["text"], {}), "speech only": (["speech"], {}),
                    **{name: (["speech", "text"], overrides) for name, overrides in VARIANTS.items()}}
        for name, (modalities, overrides) in variants.items():
            if args.systems and name not in args.systems:
                continue
            for seed in seeds:
                with tempfile.TemporaryDirectory() as workdir:
                    result = train_and_test(base, overrides, modalities, datasets, training, seed, False, workdir)
                rows.setdefault(name, []).append({**result, "fold": fold, "seed": seed})
                print(f"emodb | fold {fold} | {name} | seed {seed} | {result}", flush=True)
    return rows


def summarise(runs: list[dict], key: str, per_seed_mean_over_folds: bool) -> str:
    """mean ± std over seeds (each seed's value being the mean over folds for EmoDB)."""
    if per_seed_mean_over_folds and "seed" in runs[0]:
        by_seed = {}
        for run in runs:
            by_seed.setdefault(run["seed"], []).append(run[key])
        values = [statistics.mean(v) for v in by_seed.values()]
    elif not per_seed_mean_over_folds:
        values = [run[key] for run in runs]
    else:  # deterministic baseline: mean over folds
        values = [statistics.mean(run[key] for run in runs)]
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


ROW_ORDER = [
    "logistic regression, last layer", "logistic regression, all layers", "logistic regression, speech, all layers",
    "logistic regression, text, all layers", "logistic regression, speech + text, all layers", "text only",
    "speech only", *VARIANTS,
]
NOT_APPLICABLE_ON_TEXT = {  # MELD is text only here: one expert, no gate, no speech/text pair
    "MiSTER-E": "= text only", "no contrastive loss": "— (no pair)", "no KL term": "— (one expert)",
    "no gate (mean of experts)": "— (one expert)",
}
NOTES = """Notes:

- Seeds change the head's initialisation and the data order; the frozen backbones, the cached embeddings and the
  folds stay the same. Logistic regression has no seed (one value; EmoDB: mean over the 5 folds), though its
  solver on thousands of standardised features can move a fold by an utterance or two between runs.
- MELD here is text only (the shared copy has no audio): MiSTER-E on one modality is one expert with its context
  layer, without gate, contrastive pair or KL term, so those ablations do not apply ('—').
- EmoDB conversations are single utterances: the context layer sees no neighbours there and acts as a per-utterance
  transform. Its gate column is the mean test gate weight per expert (speech / text / cross-modal); the plug-in
  fusions have no such gate.
- Layer-weighted embeddings, learning rates and epochs: `RECIPES` in accuracy.py (`meta.recipes` in the JSON);
  MELD picks the best epoch on dev, EmoDB trains a fixed 20 epochs (no validation speakers to spare).
"""


def render(results: dict, seeds: list[int], recipe_changes: dict | None = None, backbones: dict | None = None) -> str:
    """The markdown table (mean ± std over seeds) and its notes; `recipe_changes` (from `--recipe`) and the
    backbones (when not the default Whisper tiny.en and MiniLM-L6) are stated."""
    names = [n for n in ROW_ORDER if any(n in rows for rows in results.values())]
    names += [n for rows in results.values() for n in rows if n not in names]
    folds = len({run["fold"] for runs in results.get("emodb", {}).values() for run in runs if "fold" in run})
    lines = [f"| system | MELD test weighted F1 | EmoDB accuracy ({folds} fold{'s' if folds != 1 else ''}) | EmoDB weighted F1 | EmoDB gate speech / text / cross |",
             "|---|---|---|---|---|"]
    for name in names:
        cells = []
        meld_runs = results.get("meld", {}).get(name)
        if meld_runs:
            cells.append(summarise(meld_runs, "weighted_f1", False))
        else:
            cells.append(NOT_APPLICABLE_ON_TEXT.get(name, "n/a") if "meld" in results else "not run")
        emodb_runs = results.get("emodb", {}).get(name)
        for key in ("accuracy", "weighted_f1"):
            cells.append(summarise(emodb_runs, key, True) if emodb_runs else "n/a")
        gates = [np.mean([r[g] for r in emodb_runs]) for g in ("gate_speech", "gate_text", "gate_cross-modal")
                 if emodb_runs and g in emodb_runs[0]]
        cells.append(" / ".join(f"{g:.2f}" for g in gates) if len(gates) == 3 else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    header = f"# Accuracy on real data\n\nMean ± std over seeds {seeds} (EmoDB: each seed's mean over the folds).\n\n"
    if backbones:
        header += "**Backbones**: " + ", ".join(f"{k} `{v}`" for k, v in backbones.items()) + ".\n\n"
    if recipe_changes:
        header += f"**Recipe changed from the table's** (`--recipe`): `{json.dumps(recipe_changes)}`.\n\n"
    return header + "\n".join(lines) + "\n\n" + NOTES


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_asset_args(parser, "whisper", "minilm", "emodb", "meld")
    parser.add_argument("--datasets", nargs="+", default=["meld", "emodb"], choices=["meld", "emodb"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--cache_dir", default=None, help="embedding cache (default: the package default)")
    parser.add_argument("--quick", action="store_true")
    systems = ["text only", "speech only", *VARIANTS]
    parser.add_argument("--systems", nargs="+", default=None, choices=systems, metavar="NAME",
                        help=f"train only these systems (logistic regressions always run); one of {systems}")
    parser.add_argument("--recipe", type=json.loads, default={}, metavar="JSON",
                        help='changes to the recipes, e.g. \'{"emodb": {"config": {"dropout": 0.4}, '
                             '"training": {"num_train_epochs": 40}}}\'')
    parser.add_argument("--tag", default=None, help="write accuracy-TAG.json/.md instead of accuracy.json/.md")
    parser.add_argument("--render", type=Path, default=None,
                        help="only rewrite the markdown from an earlier run's JSON (no training)")
    args = parser.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        markdown = render(saved["results"], saved["meta"]["seeds"], saved["meta"].get("recipe_changes"),
                          saved["meta"].get("backbones"))
        args.render.with_suffix(".md").write_text(markdown)
        print(markdown)
        return
    for dataset, changes in args.recipe.items():
        unknown = set(changes) - {"config", "training"} if dataset in RECIPES else {dataset}
        if unknown:
            parser.error(f"--recipe: unknown key(s) {sorted(unknown)}; expected {{dataset: {{config|training: {{...}}}}}}"
                         f" with dataset in {sorted(RECIPES)}")
        for part, values in changes.items():
            RECIPES[dataset][part] = {**RECIPES[dataset][part], **values}
    logging.set_verbosity_error()
    disable_progress_bar()
    seeds = args.seeds[:1] if args.quick else args.seeds
    start = time.perf_counter()
    results = {}
    if "meld" in args.datasets:
        results["meld"] = meld(args, seeds)
    if "emodb" in args.datasets:
        results["emodb"] = emodb(args, seeds)

    meta = {"seeds": seeds, "quick": args.quick, "seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "recipes": RECIPES, "recipe_changes": args.recipe,
            "backbones": {**({"speech": whisper_path(args).name} if "emodb" in args.datasets else {}),
                          "text": minilm_path(args).name}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    (RESULTS / f"accuracy{suffix}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    markdown = render(results, seeds, args.recipe, meta["backbones"])
    (RESULTS / f"accuracy{suffix}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main_guard(main)
