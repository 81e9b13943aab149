#!/usr/bin/env python
"""Train, evaluate and save MiSTER-E on an Emotion Recognition in Conversations corpus.

    python examples/run_erc.py --dataset meld --data_dir ../shared/data/meld \
        --text_model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --freeze_backbones \
        --output_dir runs/meld-text

Arguments may also come as one JSON or YAML file: `python examples/run_erc.py args.yaml`.

With frozen backbones, utterance embeddings are computed once into an embedding cache (keyed by backbone weights,
pooling, processor settings and data) and the context layers, experts and gate train on them; the saved model still
holds its backbones and runs on raw audio and text. Runs resume from the newest complete checkpoint in `output_dir`
(a checkpoint left incomplete by a kill is moved aside to `incomplete-checkpoint-<step>`), and a resumed run ends with
the weights and results of an uninterrupted one.

Problems the user can fix (bad data, labels that cannot train, a non-finite loss) end the run with one line on stderr
and a non-zero exit status; nothing is written from a broken state.
"""

import dataclasses
import difflib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import EarlyStoppingCallback, HfArgumentParser, TrainingArguments, set_seed

from mister_e_hf import MisterEConfig, MisterEModel, MisterEProcessor, hub
from mister_e_hf.atomic import atomic_write_json
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.data import DataCollatorForConversations, load_corpus, loader_options
from mister_e_hf.errors import CorpusError, MisterEError, TrainingError
from mister_e_hf.finetuning import finetune_backbone
from mister_e_hf.metrics import load_erc_metric
from mister_e_hf.modelcard import write_model_card
from mister_e_hf.plotting import plot_confusion_matrix, plot_gate_weights_by_class
from mister_e_hf.checkpoints import checkpoint_problem, find_resumable_checkpoint
from mister_e_hf.trainer import MisterETrainer, build_compute_metrics, check_labels, flatten_predictions


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    speech_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Speech backbone: a Hub id or a local folder (any transformers audio encoder)."}
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Text backbone: a Hub id or a local folder (an encoder or a decoder-only LM)."}
    )
    visual_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Optional visual backbone over one frame per utterance (data column `images`)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from a saved MiSTER-E model instead of fresh layers on backbones."}
    )
    head: str = field(
        default="classification",
        metadata={"help": "classification (emotion classes) or regression (dimensions given by --label_columns).",
                  "choices": ["classification", "regression"]},
    )
    freeze_backbones: bool = field(
        default=False, metadata={"help": "Keep the backbones fixed and train on cached utterance embeddings."}
    )
    backbone_finetuning: str = field(
        default="none",
        metadata={"help": "Fine-tune the backbones at the utterance level before caching.",
                  "choices": ["none", "full", "lora"]},
    )
    finetuning_epochs: float = field(default=2.0, metadata={"help": "Epochs of utterance-level backbone fine-tuning."})
    finetuning_learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of backbone fine-tuning."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "MisterEConfig settings, e.g. 'projection_dim=128,dropout=0.3,supcon_weight=0'."},
    )
    embedding_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of the embedding cache (default ~/.cache/mister_e_hf/embeddings)."}
    )
    extraction_batch_size: int = field(default=16, metadata={"help": "Utterances per backbone call when caching."})


@dataclass
class DataArguments:
    dataset: str = field(
        metadata={"help": "Corpus loader.", "choices": ["meld", "iemocap", "mosi", "emodb", "manifest"]}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "The corpus folder. Default: $MISTER_E_DATA/<dataset> when MISTER_E_DATA is set."},
    )
    audio_dir: str | None = field(default=None, metadata={"help": "MELD: folder of audio clips dia{D}_utt{U}.*"})
    label_set: str | None = field(
        default=None,
        metadata={"help": "meld: emotion|sentiment; iemocap: 4|6; mosi: binary|binary-non0|7."},
    )
    fold: int | None = field(default=None, metadata={"help": "iemocap: test session 1-5; emodb: speaker fold 0-4."})
    label_columns: str | None = field(
        default=None,
        metadata={"help": "Regression targets: comma-separated per-turn columns, e.g. valence,arousal,dominance "
                          "(IEMOCAP) or score (MOSI)."},
    )
    emodb_validation: bool = field(
        default=True, metadata={"help": "emodb: hold out the next speaker fold for model selection."}
    )
    train_file: str | None = field(default=None, metadata={"help": "manifest: training CSV/JSONL."})
    validation_file: str | None = field(default=None, metadata={"help": "manifest: validation CSV/JSONL."})
    test_file: str | None = field(default=None, metadata={"help": "manifest: test CSV/JSONL."})
    manifest_labels: str | None = field(default=None, metadata={"help": "manifest: comma-separated label set, in order."})
    skip_invalid: bool = field(
        default=False, metadata={"help": "Leave out (and report) utterances with bad labels or audio instead of failing."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training conversations."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation conversations."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep only this many test conversations."})


@dataclass
class ErcTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults suited to training on conversations."""

    num_train_epochs: float = field(default=20.0, metadata={"help": "Total number of training epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Initial learning rate."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Conversations per training batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Conversations per evaluation batch."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    logging_strategy: str = field(default="epoch", metadata={"help": "When to log."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints to keep."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best checkpoint on validation."})
    metric_for_best_model: str | None = field(default="weighted_f1", metadata={"help": "Model selection metric."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={"help": "Batch similar lengths."})
    length_column_name: str = field(default="num_turns", metadata={"help": "Column with each conversation's length."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator picks its own columns."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a fraction (< 1) of all steps."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement."}
    )


def parse_arguments():
    parser = HfArgumentParser((ModelArguments, DataArguments, ErcTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=true,d=[1,3]' -> MisterEConfig keyword arguments (values parsed as JSON when they can be;
    whole numbers given for float settings, like `supcon_weight=0`, become floats)."""
    float_fields = {f.name for f in dataclasses.fields(MisterEConfig) if "float" in str(f.type)}
    known = {f.name for f in dataclasses.fields(MisterEConfig)}
    overrides = {}
    for item in filter(None, (part.strip() for part in re.split(r",(?![^\[]*\])", text or ""))):
        if "=" not in item:
            raise MisterEError(f"config_overrides entries are key=value, got {item!r}.")
        key, value = (part.strip() for part in item.split("=", 1))
        if key not in known:  # PreTrainedConfig keeps any keyword as an attribute: a typo would do nothing
            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise MisterEError(f"--config_overrides: {key!r} is not a MisterEConfig setting"
                               + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "."))
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if value.startswith("[") and value.endswith("]"):  # a list of bare words: [text,emphasis]
                value = [part.strip() for part in value[1:-1].split(",") if part.strip()]
        overrides[key] = float(value) if key in float_fields and isinstance(value, int) else value
    return overrides


DATA_OPTIONS = {
    # loader option: (the argument that gives it, how the argument's value becomes the option's)
    "audio_dir": ("audio_dir", None),
    "label_column": ("label_set", None),  # MELD names its label set by column: emotion | sentiment
    "label_set": ("label_set", None),
    "fold": ("fold", None),
    "validation": ("emodb_validation", None),
    "train_file": ("train_file", None),
    "validation_file": ("validation_file", None),
    "test_file": ("test_file", None),
    "label_names": ("manifest_labels", lambda names: names.split(",")),
}
"""How the data arguments map onto corpus loader options. Only the options a user gave reach the loader (its own
defaults hold otherwise), and an argument the chosen corpus does not take is an error, never silently ignored."""


def load_data(data_args: DataArguments):
    data_dir = data_args.data_dir
    if data_dir is None and os.environ.get("MISTER_E_DATA") and data_args.dataset != "manifest":
        data_dir = str(Path(os.environ["MISTER_E_DATA"]) / data_args.dataset)
    if data_dir is None and data_args.dataset != "manifest":
        raise CorpusError(f"Give --data_dir (the {data_args.dataset} folder) or set MISTER_E_DATA.")
    accepted = loader_options(data_args.dataset)
    options = {"skip_invalid": data_args.skip_invalid, **({"data_dir": data_dir} if data_dir is not None else {})}
    defaults = DataArguments(dataset=data_args.dataset)
    for option, (argument, convert) in DATA_OPTIONS.items():
        value = getattr(data_args, argument)
        if value is None or value == getattr(defaults, argument):
            continue
        if option in accepted:
            options[option] = convert(value) if convert else value
        elif not any(o in accepted for o, (a, _) in DATA_OPTIONS.items() if a == argument):
            raise CorpusError(f"--{argument} does not apply to --dataset {data_args.dataset} (its loader takes: "
                              f"{', '.join(accepted)}).")
    datasets, report = load_corpus(data_args.dataset, **options)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                         ("test", data_args.max_test_samples)):
        if limit is not None and split in datasets:
            datasets[split] = datasets[split].select(range(min(limit, len(datasets[split]))))
    return datasets, report


def build_model(model_args: ModelArguments, label_names: list[str]):
    """(model, processor): a saved MiSTER-E model, or fresh MiSTER-E layers around the given backbones; for a
    regression head `label_names` are the dimensions."""
    if model_args.model_name_or_path:
        model = MisterEModel.from_pretrained(model_args.model_name_or_path)
        processor = MisterEProcessor.from_pretrained(model_args.model_name_or_path)
        if [model.config.id2label[i] for i in range(model.config.num_labels)] != label_names:
            raise MisterEError(f"{model_args.model_name_or_path} predicts {list(model.config.id2label.values())}, "
                             f"the data has {label_names}.")
        return model, processor
    paths = (model_args.speech_model_name_or_path, model_args.text_model_name_or_path,
             model_args.visual_model_name_or_path)
    if not any(paths):
        raise MisterEError("Give --speech_model_name_or_path, --text_model_name_or_path and/or "
                         "--visual_model_name_or_path (or --model_name_or_path).")
    frozen = model_args.freeze_backbones or model_args.backbone_finetuning != "none"
    model = MisterEModel.from_backbones(
        *paths,
        freeze_speech_backbone=frozen,
        freeze_text_backbone=frozen,
        freeze_visual_backbone=frozen,
        id2label=dict(enumerate(label_names)),
        head=model_args.head,
        **parse_overrides(model_args.config_overrides),
    )
    processor = MisterEProcessor.from_backbones(*paths, text_views=model.config.text_views)
    return model, processor


def evaluate_split(trainer, dataset, split, label_names, expert_names, output_dir, head="classification"):
    """Metrics of one split under `<split>_` names; for classification also a confusion-matrix PNG (and JSON) and the
    mean gate weights per class."""
    prediction = trainer.predict(dataset, metric_key_prefix=split)
    predicted, true, probabilities, gates = flatten_predictions(prediction.predictions, prediction.label_ids)
    metrics = dict(prediction.metrics)
    if head == "regression":  # CCC / MAE per dimension come from compute_metrics
        return metrics
    extra = {}
    if "score" in dataset.column_names:  # CMU-MOSI: binary accuracy/F1 (has-0, non-0), MAE and Pearson of the score
        scores = np.array([s for row, labels in zip(dataset["score"], dataset["labels"])
                           for s, label in zip(row, labels) if label != -1], dtype=np.float64)
        extra = {"scores": scores, "predicted_scores": predicted_scores(probabilities, label_names)}
    detailed = load_erc_metric().compute(predictions=predicted, references=true, label_names=label_names, **extra)
    matrix = detailed.pop("confusion_matrix")
    undefined = sorted(k for k, v in detailed.items() if isinstance(v, float) and not np.isfinite(v))
    if undefined:  # e.g. MOSI's non-0 binary scores when every true score is 0: no value, not NaN in the JSON
        logger.warning(f"{split}: {undefined} are undefined on this split; written as null.")
        detailed.update(dict.fromkeys(undefined))
    metrics.update({f"{split}_{k}": v for k, v in detailed.items()})
    plot_confusion_matrix(matrix, label_names, Path(output_dir) / f"confusion_matrix_{split}.png",
                          title=f"{split}: weighted F1 {100 * detailed['weighted_f1']:.1f}")
    plot_gate_weights_by_class(gates, true, label_names, expert_names, Path(output_dir) / f"gate_weights_{split}.png",
                               title=f"{split}: mean gate weight by true class")
    atomic_write_json(Path(output_dir) / f"confusion_matrix_{split}.json", {"labels": label_names, "matrix": matrix},
                      indent=1)
    return metrics


def predicted_scores(probabilities: np.ndarray, label_names: list[str]) -> np.ndarray:
    """A sentiment score per utterance: the expected class value for numeric labels ('-3'..'3'), else
    P(positive) - P(negative) scaled to [-3, 3] for binary labels."""
    try:
        values = np.array([float(name) for name in label_names])
    except ValueError:
        values = np.array([3.0 if "pos" in name else -3.0 for name in label_names])
    return probabilities @ values


def main():
    model_args, data_args, training_args = parse_arguments()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # one upload at the end, not per save

    need_optimizer = not training_args.save_only_model
    resume = training_args.resume_from_checkpoint
    if resume:  # given: it must be complete
        problem = checkpoint_problem(resume, need_optimizer)
        if problem:
            raise TrainingError(f"Cannot resume from --resume_from_checkpoint {resume}: {problem}.")
    else:  # the newest complete checkpoint; incomplete ones are moved aside
        resume = find_resumable_checkpoint(output_dir, need_optimizer)  # the trainer says "Resuming from ..."

    datasets, report = load_data(data_args)
    report.save(output_dir / "data_report.json")
    logger.info("Data: " + ", ".join(f"{k} {len(v)} conversations" for k, v in datasets.items()) + "; " + report.summary())
    label_columns = data_args.label_columns.split(",") if data_args.label_columns else None
    if (model_args.head == "regression") != bool(label_columns):
        raise MisterEError("A regression head needs --label_columns (and --label_columns needs --head regression).")
    label_names = label_columns or datasets["train"].features["labels"].feature.names
    if model_args.head == "regression" and training_args.metric_for_best_model == "weighted_f1":
        training_args.metric_for_best_model = "ccc_mean"
    for split in datasets:  # labels that cannot train or evaluate are refused now, before any extraction
        check_labels(datasets[split], split, label_names, model_args.head, label_columns=label_columns,
                     training=split == "train")

    model, processor = build_model(model_args, label_names)
    if model_args.backbone_finetuning != "none":
        for modality in model.config.modalities:
            finetune_backbone(model, processor, modality, datasets, method=model_args.backbone_finetuning,
                              epochs=model_args.finetuning_epochs, learning_rate=model_args.finetuning_learning_rate,
                              lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                              output_dir=output_dir / f"finetuning-{modality}", seed=training_args.seed)

    timings = {}
    cached = all(getattr(model.config, f"freeze_{m}_backbone") for m in model.config.modalities)
    if cached:
        start = time.perf_counter()
        datasets, stats = add_cached_embeddings(model, processor, datasets, model_args.embedding_cache_dir,
                                                model_args.extraction_batch_size)
        timings = {"embedding_seconds": round(time.perf_counter() - start, 2),
                   "extraction_seconds": round(stats.extraction_seconds, 2),
                   "cached_utterances": stats.cached_utterances, "utterances_embedded": stats.utterances_embedded,
                   "cache_shards_set_aside": stats.shards_set_aside}
        logger.info(f"Embedding cache: {timings}")

    callbacks = []
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(training_args.early_stopping_patience))
    has_validation = "validation" in datasets
    if not has_validation:
        training_args.eval_strategy, training_args.load_best_model_at_end = "no", False
    trainer = MisterETrainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),
        data_collator=DataCollatorForConversations(processor, label_columns=label_columns),
        processing_class=processor,
        compute_metrics=build_compute_metrics(label_names, model.expert_names, head=model_args.head),
        callbacks=callbacks,
    )

    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_metrics = {**train_result.metrics, **timings, "train_wall_seconds": round(time.perf_counter() - start, 2)}
    if resume:  # train_loss is the whole run's; the times and speeds are this process's
        train_metrics["resumed_from_checkpoint"] = Path(resume).name
    trainer.save_model()  # model + processor, with code and auto_map
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()

    results = {}
    for split in ("validation", "test"):
        if split in datasets:
            prefix = "eval" if split == "validation" else "test"
            metrics = evaluate_split(trainer, datasets[split], prefix, label_names, model.expert_names, output_dir,
                                     model_args.head)
            trainer.save_metrics(prefix, metrics)
            results.update(metrics)
    logger.info("Results: " + json.dumps({k: v for k, v in results.items() if any(
        name in k for name in ("f1", "acc", "ccc"))}, indent=1))

    repo_id = training_args.hub_model_id or output_dir.name
    details = "".join(f", {name} {value}" for name, value in (("label set", data_args.label_set),
                                                              ("fold", data_args.fold)) if value is not None)
    write_model_card(output_dir, model, dataset=data_args.dataset, label_names=label_names, results=results,
                     training_args=training_args, data_report=report, repo_id=repo_id, dataset_details=details)
    if push_to_hub:  # model, processor, code, card and results in one commit; checkpoints stay local
        commit = hub.push_to_hub(output_dir, repo_id, token=training_args.hub_token,
                                 private=training_args.hub_private_repo)
        logger.info(f"Pushed to {commit.commit_url}")


def run() -> int:
    """`main()`, with a problem the user can fix (a `MisterEError`: bad data, labels that cannot train, a non-finite
    loss, an incomplete checkpoint) reported as one line on stderr and exit status 1."""
    try:
        main()
    except (MisterEError, StrictDataclassError) as error:  # config settings are checked by strict dataclasses
        message = " ".join(str(error).split())
        logger.error(message)
        print(f"run_erc.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
