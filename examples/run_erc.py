#!/usr/bin/env python
"""Train, evaluate and save MiSTER-E on an Emotion Recognition in Conversations corpus.

    python examples/run_erc.py --dataset meld --data_dir ../shared/data/meld \
        --text_model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --freeze_backbones \
        --output_dir runs/meld-text

Arguments may also come as one JSON or YAML file of `name: value` pairs, checked exactly as on the command line
(`python examples/run_erc.py args.yaml`, optionally followed by more arguments, which win).

With none of `--do_train`, `--do_eval`, `--do_predict` given, the script trains, evaluates on the validation split
and predicts on the test split (those the corpus has); given any of them, it does exactly those. Evaluating or
predicting without training takes the model of `--model_name_or_path` and writes only results into `--output_dir`.

With frozen backbones, utterance embeddings are computed once into an embedding cache (keyed by backbone weights,
pooling, processor settings and data) and the context layers, experts and gate train on them; the saved model still
holds its backbones and runs on raw audio and text. Runs resume from the newest complete checkpoint in `output_dir`
(a checkpoint left incomplete by a kill is moved aside to `incomplete-checkpoint-<step>`), and a resumed run ends with
the weights and results of an uninterrupted one.

Problems the user can fix (bad arguments, bad data, labels that cannot train, a non-finite loss) end the run with one
line on stderr and a non-zero exit status, arguments before anything is loaded; nothing is written from a broken
state, and no argument is silently ignored.
"""

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import yaml
from datasets import DatasetDict
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils import validate_repo_id
from transformers import EarlyStoppingCallback, HfArgumentParser, TrainingArguments, set_seed
from transformers.hf_argparser import string_to_bool

from mister_e_hf import FROZEN_BACKBONE_DEFAULTS, MisterEConfig, MisterEModel, MisterEProcessor, distributed, hub
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.checkpoints import check_resume_settings, checkpoint_problem, find_resumable_checkpoint
from mister_e_hf.data import DataCollatorForConversations, load_corpus, loader_arguments, loader_options
from mister_e_hf.errors import CorpusError, MisterEError, TrainingError
from mister_e_hf.finetuning import finetune_backbone, finetuning_problems
from mister_e_hf.evaluation import build_trainer, evaluate_split
from mister_e_hf.modelcard import write_model_card
from mister_e_hf.registry import HEADS, LOADERS
from mister_e_hf.trainer import build_compute_metrics, check_labels, check_training_arguments, training_argument_problems


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    plugins: str | None = field(
        default=None, metadata={"help": "Comma-separated Python modules (or .py files) imported first: plug-in "
                                        "components (fusions, heads, gates, context layers, poolings, layer "
                                        "combiners, corpus loaders) register themselves when imported."}
    )
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
        metadata={"help": "A registered head: classification (emotion classes), regression (dimensions given by "
                          "--label_columns), or a plug-in's (import it with --plugins)."},
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
    backbone_dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the frozen backbones' weights for extraction (half the memory in bfloat16 / "
                          "float16; MiSTER-E's layers stay float32).", "choices": ["float32", "bfloat16", "float16"]},
    )


@dataclass
class DataArguments:
    dataset: str = field(
        metadata={"help": f"A registered corpus loader: {', '.join(LOADERS)}, or a plug-in's (see --plugins)."}
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


ARGUMENT_FILES = (".json", ".yaml", ".yml")
STAGES = ("do_train", "do_eval", "do_predict")


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are `MisterEError`s (one line from `run`), without abbreviated option names
    (a prefix of an option silently meant that option)."""

    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, allow_abbrev=False)

    def error(self, message):
        raise MisterEError(message)


def _file_arguments(path: str, parser: ArgumentParser) -> list[str]:
    """The command-line form of an argument file (JSON, or YAML): a mapping of argument names to values, turned into
    `--name value` so that argparse converts and checks every value as it does on the command line (`"two"` is no
    float; YAML reads `1e-3` as a string, argparse as a float). Lists give several values to list arguments;
    `config_overrides` may be a mapping of settings."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise MisterEError(f"{path}: cannot read the argument file ({' '.join(str(error).split())}).") from None
    if not isinstance(data, dict):
        raise MisterEError(f"{path}: an argument file holds a mapping of argument names to values, not a "
                           f"{type(data).__name__}.")
    actions = {option: action for option, action in parser._option_string_actions.items() if option.startswith("--")}
    arguments = []
    for key, value in data.items():
        action = actions.get(f"--{key}") if isinstance(key, str) else None
        if action is None or action.dest == "help":
            close = difflib.get_close_matches(str(key), [o[2:] for o in actions], n=1)
            raise MisterEError(f"{path}: {key!r} is not an argument of run_erc.py"
                               + (f"; did you mean {close[0]!r}?" if close else "."))
        if value is None:
            if action.default is not None:
                raise MisterEError(f"{path}: {key} is null; leave it out for its default ({action.default!r}).")
            continue
        if key == "config_overrides" and isinstance(value, dict):
            value = json.dumps(value)
        if action.nargs == 0:  # a flag, e.g. no_emodb_validation: true (false leaves it off)
            if not isinstance(value, bool):
                raise MisterEError(f"{path}: {key} is a flag: true or false, not {value!r}.")
            arguments += [f"--{key}"] if value else []
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            arguments += [f"--{key}", *(_command_line_value(v) for v in value)]
        else:
            arguments.append(f"--{key}={_command_line_value(value)}")
    return arguments


def _command_line_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def parse_arguments(argv: list[str] | None = None):
    """(model arguments, data arguments, training arguments, the names of the arguments given, the stages asked
    for: `{"do_train": bool, ...}` for those of `STAGES` given) from `argv` (default: the command line): options, or
    an argument file first (`args.yaml`, `args.json`) then options. `TrainingArguments` turns `do_eval` on whenever
    an evaluation strategy is set, so the stages asked for come from the arguments themselves."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser((ModelArguments, DataArguments, ErcTrainingArguments))
    arguments = argv
    if argv and argv[0].endswith(ARGUMENT_FILES) and not argv[0].startswith("-"):
        try:
            arguments = _file_arguments(argv[0], parser) + argv[1:]
        except MisterEError as error:
            raise MisterEError(str(error) if str(error).startswith(argv[0]) else f"{argv[0]}: {error}") from None
    given = {parser._option_string_actions[option].dest for option in
             (a.split("=", 1)[0] for a in arguments if a.startswith("--")) if option in parser._option_string_actions}
    try:
        model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
            arguments, return_remaining_strings=True, look_for_args_file=False)
    except MisterEError as error:
        raise MisterEError(f"{error} (arguments from {argv[0]})" if arguments is not argv else str(error)) from None
    except ValueError as error:  # a dataclass's own check (e.g. TrainingArguments: bf16 without a GPU)
        raise MisterEError(" ".join(str(error).split())) from None
    if remaining:
        raise MisterEError(f"unrecognized arguments: {' '.join(remaining)}")
    stages = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # values already checked by the parser
    for stage in STAGES:
        stages.add_argument(f"--{stage}", type=string_to_bool, nargs="?", const=True, default=None)
    requested = vars(stages.parse_known_args(arguments)[0])
    return model_args, data_args, training_args, given, {k: v for k, v in requested.items() if v is not None}


RESERVED_OVERRIDES = {
    "head": "--head", "id2label": "the data's labels", "label2id": "the data's labels",
    "num_labels": "the data's labels", "backbone_dtype": "--backbone_dtype",
    "freeze_speech_backbone": "--freeze_backbones",
    "freeze_text_backbone": "--freeze_backbones", "freeze_visual_backbone": "--freeze_backbones",
    **{f"{m}_{kind}": f"--{m}_model_name_or_path" for m in ("speech", "text", "visual")
       for kind in ("config", "backbone_name_or_path")},
}
"""MisterEConfig settings that run_erc sets from its own arguments: given in --config_overrides they would clash."""


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=true,d=[1,3]', or a JSON object '{"a": 1}' -> MisterEConfig keyword arguments (values parsed as
    JSON when they can be; whole numbers given for float settings, like `supcon_weight=0`, become floats)."""
    float_fields = {f.name for f in dataclasses.fields(MisterEConfig) if "float" in str(f.type)}
    known = {f.name for f in dataclasses.fields(MisterEConfig)}
    text = (text or "").strip()
    if text.startswith("{"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise MisterEError(f"config_overrides is not a valid JSON object ({error}).") from None
        if not isinstance(items, dict):
            raise MisterEError("config_overrides as JSON is an object of settings.")
        items = list(items.items())
    else:
        items = []
        for item in filter(None, (part.strip() for part in re.split(r",(?![^\[]*\])", text))):
            if "=" not in item:
                raise MisterEError(f"config_overrides entries are key=value, got {item!r}.")
            key, value = (part.strip() for part in item.split("=", 1))
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                if value.startswith("[") and value.endswith("]"):  # a list of bare words: [text,emphasis]
                    value = [part.strip() for part in value[1:-1].split(",") if part.strip()]
            items.append((key, value))
    overrides = {}
    for key, value in items:
        if key in RESERVED_OVERRIDES:
            raise MisterEError(f"--config_overrides: {key!r} is set by {RESERVED_OVERRIDES[key]}, not by an override.")
        if key not in known:  # PreTrainedConfig keeps any keyword as an attribute: a typo would do nothing
            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise MisterEError(f"--config_overrides: {key!r} is not a MisterEConfig setting"
                               + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "."))
        overrides[key] = float(value) if key in float_fields and isinstance(value, int) and not isinstance(
            value, bool) else value
    return overrides


DATA_OPTIONS = {
    # data argument: (the generic loader option it gives, how its value becomes the option's)
    "audio_dir": ("audio_dir", None),
    "label_set": ("label_set", None),
    "fold": ("fold", None),
    "emodb_validation": ("validation", None),
    "train_file": ("train_file", None),
    "validation_file": ("validation_file", None),
    "test_file": ("test_file", None),
    "manifest_labels": ("label_names", lambda names: names.split(",")),
}
"""How the data arguments map onto corpus loader options (`mister_e_hf.data.loader_arguments`). Only the options a
user gave reach the loader (its own defaults hold otherwise), and an argument the chosen corpus does not take is an
error, never silently ignored."""


def load_data(data_args: DataArguments, label_names: list[str] | None = None):
    """(DatasetDict, DataReport) of the corpus. `label_names`: the label set (in id order) of the model to use, for
    loaders that take one when the user gave none (a manifest without --manifest_labels): a test-only manifest
    then keeps the saved model's label ids even if some class is absent from it."""
    data_dir = data_args.data_dir
    if data_dir is None and os.environ.get("MISTER_E_DATA") and data_args.dataset != "manifest":
        data_dir = str(Path(os.environ["MISTER_E_DATA"]) / data_args.dataset)
    if data_dir is None and data_args.dataset != "manifest":
        raise CorpusError(f"Give --data_dir (the {data_args.dataset} folder) or set MISTER_E_DATA.")
    defaults = DataArguments(dataset=data_args.dataset)
    given = {option: (convert(value) if convert else value)
             for argument, (option, convert) in DATA_OPTIONS.items()
             if (value := getattr(data_args, argument)) is not None and value != getattr(defaults, argument)}
    flags = {option: f"--{argument}" for argument, (option, _) in DATA_OPTIONS.items()}
    options = loader_arguments(data_args.dataset, {**flags, "skip_invalid": "--skip_invalid"}, data_dir=data_dir,
                               skip_invalid=data_args.skip_invalid or None, **given)
    accepted = loader_options(data_args.dataset)
    if label_names is not None and "label_names" in accepted and "label_names" not in options:
        options["label_names"] = list(label_names)
    datasets, report = load_corpus(data_args.dataset, **options)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                         ("test", data_args.max_test_samples)):
        if limit is not None and split in datasets:
            datasets[split] = datasets[split].select(range(min(limit, len(datasets[split]))))
    return datasets, report


def saved_model_config(model_args: ModelArguments) -> MisterEConfig | None:
    """The config of `--model_name_or_path` (read before anything is loaded), or None."""
    path = model_args.model_name_or_path
    if not path:
        return None
    folder = Path(path)
    if folder.exists() and not (folder / "config.json").is_file():
        raise MisterEError(f"--model_name_or_path {path}: no config.json; not a saved model folder.")
    try:
        return MisterEConfig.from_pretrained(path)
    except MisterEError:
        raise
    except (OSError, ValueError, TypeError) as error:
        raise MisterEError(f"--model_name_or_path {path}: cannot load its config ({str(error).splitlines()[0]}).") \
            from None


def build_model(model_args: ModelArguments, label_names: list[str]):
    """(model, processor): a saved MiSTER-E model, used as saved, or fresh MiSTER-E layers around the given
    backbones; for a regression head `label_names` are the dimensions."""
    if model_args.model_name_or_path:
        model = MisterEModel.from_pretrained(model_args.model_name_or_path)
        processor = MisterEProcessor.from_pretrained(model_args.model_name_or_path)
        if [model.config.id2label[i] for i in range(model.config.num_labels)] != label_names:
            raise MisterEError(f"{model_args.model_name_or_path} predicts {list(model.config.id2label.values())}, "
                               f"the data has {label_names}.")
        return model, processor
    paths = (model_args.speech_model_name_or_path, model_args.text_model_name_or_path,
             model_args.visual_model_name_or_path)
    frozen = model_args.freeze_backbones or model_args.backbone_finetuning != "none"
    # frozen backbones: the recipe chosen without test data (FROZEN_BACKBONE_DEFAULTS), for the modalities given
    given = {m for m, path in zip(("speech", "text", "visual"), paths) if path}
    recipe = {key: value for key, value in FROZEN_BACKBONE_DEFAULTS.items()
              if frozen and (not key.endswith("_layers") or key.removesuffix("_layers") in given)}
    model = MisterEModel.from_backbones(
        *paths,
        freeze_speech_backbone=frozen,
        freeze_text_backbone=frozen,
        freeze_visual_backbone=frozen,
        id2label=dict(enumerate(label_names)),
        head=model_args.head,
        **({"backbone_dtype": model_args.backbone_dtype} if model_args.backbone_dtype != "float32" else {}),
        **{**recipe, **parse_overrides(model_args.config_overrides)},
    )
    processor = MisterEProcessor.from_backbones(*paths, text_views=model.config.text_views)
    return model, processor


# --------------------------------------------------------------------------------------------- argument checks
FINETUNING_OPTIONS = ("finetuning_epochs", "finetuning_learning_rate", "lora_r", "lora_alpha")
AS_SAVED = ("config_overrides", "speech_model_name_or_path", "text_model_name_or_path", "visual_model_name_or_path")
"""Arguments that build a model: with --model_name_or_path the saved model is used as saved, so they cannot apply."""
EVALUATION_OPTIONS = ("eval_strategy", "load_best_model_at_end", "metric_for_best_model", "early_stopping_patience")


def requested_stages(stages: dict) -> tuple[bool, bool, bool]:
    """(train, evaluate, predict): all three when none of --do_train / --do_eval / --do_predict was given (train,
    then evaluate on the validation split and predict on the test split, those the corpus has), else those given."""
    if not stages:
        return True, True, True
    return tuple(bool(stages.get(stage)) for stage in STAGES)


def folder_problem(path: str | None, what: str) -> str | None:
    """Why `path` cannot be (or become) a folder: it, or the nearest of its parents that exists, is not a folder."""
    if not path:
        return None
    existing = Path(path).expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return (f"{what} {path} " + ("is a file, not a folder" if existing == Path(path).expanduser() else
                                     f"is inside {existing}, which is a file, not a folder"))
    return None


def caches_embeddings(model_args: ModelArguments, saved: MisterEConfig | None) -> bool:
    """Whether the run trains on cached embeddings (every backbone of the model frozen)."""
    if saved is not None:
        return all(getattr(saved, f"freeze_{m}_backbone") for m in saved.modalities)
    return model_args.freeze_backbones or model_args.backbone_finetuning != "none"


def import_plugins(plugins: str | None) -> list[str]:
    """Imports each comma-separated module name or `.py` file of `plugins` (their components register themselves)."""
    imported = []
    for plugin in filter(None, (part.strip() for part in (plugins or "").split(","))):
        try:
            if plugin.endswith(".py"):
                path = Path(plugin)
                if not path.is_file():
                    raise FileNotFoundError(f"no file {plugin}")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except MisterEError:
            raise
        except Exception as error:  # the plug-in's own failure: say which plug-in, keep its message
            raise MisterEError(f"--plugins: importing {plugin!r} failed: {type(error).__name__}: {error}") from error
        imported.append(plugin)
    return imported


def _saved_model_problems(model_args, training_args, given, saved, same_folder) -> list[str]:
    """Options a saved model (--model_name_or_path) ignores, or the lack of any backbone without one."""
    path = model_args.model_name_or_path
    if saved is None:
        if not any(getattr(model_args, name) for name in AS_SAVED[1:]):
            return ["give --speech_model_name_or_path, --text_model_name_or_path and/or "
                    "--visual_model_name_or_path (or --model_name_or_path)"]
        return []
    problems = []
    ignored = [f"--{name}" for name in AS_SAVED if name in given]
    if "head" in given and model_args.head != saved.head:
        ignored.append(f"--head {model_args.head} (it has a {saved.head} head)")
    frozen = caches_embeddings(model_args, saved)
    if "freeze_backbones" in given and model_args.freeze_backbones != frozen:
        ignored.append(f"--freeze_backbones {str(model_args.freeze_backbones).lower()} (its backbones are "
                       f"{'frozen' if frozen else 'not frozen'})")
    if model_args.backbone_finetuning != "none":
        ignored.append(f"--backbone_finetuning {model_args.backbone_finetuning}")
    if "backbone_dtype" in given:
        ignored.append(f"--backbone_dtype {model_args.backbone_dtype} (its config says "
                       f"{saved.backbone_dtype or 'float32'})")
    if ignored:
        problems.append(f"{', '.join(ignored)} cannot apply with --model_name_or_path: the saved model {path} is "
                        "used as saved (its config, head, backbones and freezing); leave them out, or build a new "
                        "model from backbones without --model_name_or_path")
    if same_folder:
        problems.append(f"--output_dir is the folder of --model_name_or_path ({path}): the run would overwrite the "
                        "saved model or its results; give another --output_dir")
    return problems


def _stage_problems(training_args, given, stages, saved, same_folder) -> list[str]:
    """Stages that cannot run, or training options given to a run that does not train."""
    train, evaluate, predict = stages
    problems = []
    if not (train or evaluate or predict):
        problems.append("--do_train, --do_eval and --do_predict are all false: nothing to do")
    if train:
        return problems
    if (evaluate or predict) and saved is None:
        problems.append("evaluating or predicting without training (--do_train not given) needs "
                        "--model_name_or_path, the model to use")
    not_applying = [f"--{name}" for name in ("resume_from_checkpoint", "push_to_hub", "backbone_finetuning",
                                              *FINETUNING_OPTIONS, "early_stopping_patience") if name in given]
    if not_applying:
        problems.append(f"{', '.join(not_applying)} apply to training only, and --do_train is not given")
    if saved is not None and (Path(training_args.output_dir) / "config.json").exists() and not same_folder:
        problems.append(f"--output_dir {training_args.output_dir} holds a saved model, whose results this "
                        "evaluation would overwrite; give another --output_dir")
    return problems


def _label_column_problems(model_args, data_args, saved) -> list[str]:
    """--label_columns must name each regression dimension once, and be given exactly to heads of values."""
    head = saved.head if saved is not None else model_args.head
    problems = []
    label_columns = [c.strip() for c in data_args.label_columns.split(",")] if data_args.label_columns else None
    if label_columns is not None:
        repeated = sorted({c for c in label_columns if label_columns.count(c) > 1})
        if "" in label_columns or repeated:
            problems.append(f"--label_columns {data_args.label_columns!r} "
                            + (f"repeats {repeated}" if repeated else "has an empty name")
                            + ": give each regression dimension once")
    values = HEADS[head].target == "values"  # a head of values reads them from --label_columns
    if values != bool(label_columns):
        problems.append(f"a {head} head " + ("needs --label_columns (the per-turn columns of its dimensions)"
                                             if values else "takes class labels, not --label_columns")
                        + ("" if saved is None else f" ({model_args.model_name_or_path} has a {head} head)"))
    return problems


def _finetuning_and_cache_problems(model_args, given, train, saved) -> list[str]:
    """Backbone fine-tuning settings, --config_overrides, and cache options that need frozen backbones."""
    head = saved.head if saved is not None else model_args.head
    problems = []
    if model_args.backbone_finetuning != "none":
        problems += [f"--backbone_finetuning: {problem}" for problem in finetuning_problems(
            model_args.backbone_finetuning, model_args.finetuning_epochs, model_args.finetuning_learning_rate,
            model_args.lora_r, model_args.lora_alpha, head)]
        if model_args.backbone_finetuning == "full" and {"lora_r", "lora_alpha"} & given:
            problems.append("--lora_r and --lora_alpha apply to --backbone_finetuning lora only")
    elif train and set(FINETUNING_OPTIONS) & given:
        problems.append(f"{', '.join(f'--{o}' for o in FINETUNING_OPTIONS if o in given)} do nothing without "
                        "--backbone_finetuning full|lora")
    cached = caches_embeddings(model_args, saved)
    if model_args.backbone_dtype != "float32" and (model_args.backbone_finetuning != "none" or not cached):
        problems.append(f"--backbone_dtype {model_args.backbone_dtype} is for frozen backbones, whose embeddings are "
                        "cached (--freeze_backbones, without --backbone_finetuning); train trainable backbones in "
                        "mixed precision (--bf16) instead")
    if saved is None:
        try:
            overrides = parse_overrides(model_args.config_overrides)
        except MisterEError as error:
            problems.append(str(error).rstrip("."))
            overrides = {}
        if overrides.get("standardize_embeddings") and not cached:
            problems.append("standardize_embeddings=true standardises cached embeddings, fitted on the training set: "
                            "it needs --freeze_backbones (or --backbone_finetuning)")
    if not cached and {"embedding_cache_dir", "extraction_batch_size"} & given:
        problems.append("--embedding_cache_dir and --extraction_batch_size apply to frozen backbones only "
                        "(--freeze_backbones), whose embeddings are cached")
    return problems


def _value_problems(model_args, data_args, training_args, train) -> list[str]:
    """Numbers out of range, unusable folders, an invalid Hub id, and Trainer settings that cannot work."""
    problems = []
    if training_args.early_stopping_patience is not None and training_args.early_stopping_patience < 1:
        problems.append(f"--early_stopping_patience is {training_args.early_stopping_patience} (it must be >= 1; "
                        "leave it out not to stop early)")
    if model_args.extraction_batch_size < 1:
        problems.append(f"--extraction_batch_size is {model_args.extraction_batch_size} (it must be >= 1)")
    for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} is {value} (it must be >= 1; leave it out to keep every conversation)")
    for what, folder in (("--output_dir", training_args.output_dir),
                         ("--embedding_cache_dir", model_args.embedding_cache_dir)):
        problem = folder_problem(folder, what)
        if problem:
            problems.append(problem)
    if train and training_args.push_to_hub:
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            problems.append(f"--push_to_hub: {repo_id!r} is not a valid Hub repository id "
                            f"({str(error).split('.')[0]}); give --hub_model_id namespace/name")
    # run_erc always computes metrics; which ones is known once the model is built (checked again then)
    problems += [f"--{problem}" for problem in training_argument_problems(training_args, compute_metrics=True,
                                                                          training=train)]
    return problems


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                    given: set[str], stages: tuple[bool, bool, bool], saved: MisterEConfig | None) -> None:
    """Refuses, in one `MisterEError` listing them all and before anything is loaded, arguments that would be
    silently ignored, that contradict each other, or whose values cannot work."""
    path = model_args.model_name_or_path
    same_folder = saved is not None and Path(path).exists() and (
        Path(training_args.output_dir).resolve() == Path(path).resolve())
    problems = (_saved_model_problems(model_args, training_args, given, saved, same_folder)
                + _stage_problems(training_args, given, stages, saved, same_folder)
                + _label_column_problems(model_args, data_args, saved)
                + _finetuning_and_cache_problems(model_args, given, stages[0], saved)
                + _value_problems(model_args, data_args, training_args, stages[0]))
    if problems:
        raise MisterEError("; ".join(problems) + ".")


def check_splits(datasets: DatasetDict, stages: tuple[bool, bool, bool], explicit: bool) -> DatasetDict:
    """The splits this run uses (train to train, validation to evaluate and to select a model while training, test
    to predict), refusing a missing one that was asked for; the others are dropped, so that nothing is extracted
    for them."""
    train, evaluate, predict = stages
    wanted = {"train": train, "validation": evaluate, "test": predict}
    asked = {"train": "--do_train" if explicit else "training", "validation": "--do_eval", "test": "--do_predict"}
    for split, needed in wanted.items():
        if needed and split not in datasets and (explicit or split == "train"):
            raise MisterEError(f"{asked[split]} needs a {split} split, and the corpus has only "
                               f"{', '.join(datasets) or 'none'}.")
    keep = {"train": train, "validation": train or evaluate, "test": predict}
    return DatasetDict({split: data for split, data in datasets.items() if keep.get(split)})


def find_resume(training_args, output_dir: Path) -> str | None:
    """The checkpoint to resume from: the one given (it must be complete), else the newest complete one of
    `output_dir` (incomplete ones are moved aside), else None."""
    need_optimizer = not training_args.save_only_model
    resume = training_args.resume_from_checkpoint
    if resume:
        if problem := checkpoint_problem(resume, need_optimizer):
            raise TrainingError(f"Cannot resume from --resume_from_checkpoint {resume}: {problem}.")
        return resume
    return find_resumable_checkpoint(output_dir, need_optimizer)  # the trainer says "Resuming from ..."


def prepare_data(data_args, training_args, given, asked, stages, saved, head, output_dir):
    """(datasets, report, label_names, label_columns, stages): the corpus loaded, its report saved, the splits the
    stages need, every split's labels checked (before any extraction), and the training arguments set to what the
    data allow (the head's headline metric for model selection; no evaluation without a validation split)."""
    saved_labels = [saved.id2label[i] for i in range(saved.num_labels)] if saved is not None else None
    datasets, report = load_data(data_args, saved_labels if HEADS[head].target == "classes" else None)
    if training_args.should_save:
        report.save(output_dir / "data_report.json")
    logger.info("Data: " + ", ".join(f"{k} {len(v)} conversations" for k, v in datasets.items()) + "; " + report.summary())
    datasets = check_splits(datasets, stages, explicit=bool(asked))
    stages = (stages[0], stages[1] and "validation" in datasets, stages[2] and "test" in datasets)
    training_args.do_train, training_args.do_eval, training_args.do_predict = stages
    label_columns = [c.strip() for c in data_args.label_columns.split(",")] if data_args.label_columns else None
    label_names = label_columns or next(iter(datasets.values())).features["labels"].feature.names
    if "metric_for_best_model" not in given:  # what the head leads with (weighted F1, mean CCC, ...)
        training_args.metric_for_best_model = HEADS[head].headline_metric
        training_args.greater_is_better = HEADS[head].greater_is_better
    if not stages[0] or "validation" not in datasets:  # no evaluation while training
        asked_for = [f"--{name}" for name in EVALUATION_OPTIONS if name in given and getattr(training_args, name)]
        if stages[0] and training_args.eval_strategy != "no" and asked_for:
            raise MisterEError(f"{', '.join(asked_for)} {'needs' if len(asked_for) == 1 else 'need'} a validation "
                               f"split to evaluate on while training, and the corpus has only {', '.join(datasets)}: "
                               f"leave {'it' if len(asked_for) == 1 else 'them'} out, or give a validation split.")
        training_args.eval_strategy, training_args.load_best_model_at_end = "no", False
    check_all_labels(datasets, label_names, head, label_columns)
    return datasets, report, label_names, label_columns, stages


def check_all_labels(datasets, label_names, head, label_columns) -> None:
    for split in datasets:  # labels that cannot train or evaluate are refused before any compute
        check_labels(datasets[split], split, label_names, head, label_columns=label_columns, training=split == "train")


def extract(model, processor, datasets, model_args, data_args, report, output_dir, label_names, label_columns,
            save: bool = True):
    """(datasets with cached embedding columns, timings) when every backbone is frozen, else as given; `save`:
    this process writes the run folder (the data report updated under --skip_invalid)."""
    if not all(getattr(model.config, f"freeze_{m}_backbone") for m in model.config.modalities):
        return datasets, {}
    start = time.perf_counter()
    datasets, stats = add_cached_embeddings(model, processor, datasets, model_args.embedding_cache_dir,
                                            model_args.extraction_batch_size, skip_invalid=data_args.skip_invalid,
                                            report=report)
    if data_args.skip_invalid:  # inputs refused at extraction were left out: counted, and checked again
        if save:
            report.save(output_dir / "data_report.json")
        logger.info(f"After extraction: {report.summary()}")
        check_all_labels(datasets, label_names, model.config.head, label_columns)
    per_rank = distributed.all_gather_objects(stats.utterances_embedded)  # each process embeds its share
    timings = {"embedding_seconds": round(time.perf_counter() - start, 2),
               "extraction_seconds": round(stats.extraction_seconds, 2),
               "cached_utterances": stats.cached_utterances, "utterances_embedded": sum(per_rank),
               "cache_shards_set_aside": stats.shards_set_aside}
    if len(per_rank) > 1:
        timings["utterances_embedded_per_rank"] = per_rank
    logger.info(f"Embedding cache: {timings}")
    return datasets, timings


def train(trainer, resume: str | None, timings: dict) -> None:
    """Trains (resuming from `resume`), then saves the model, processor, training metrics and state."""
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_metrics = {**train_result.metrics, **timings, "train_wall_seconds": round(time.perf_counter() - start, 2),
                     "num_processes": trainer.args.world_size,
                     "train_utterances": sum(trainer.train_dataset["num_turns"])}
    digests = getattr(trainer, "embedding_statistics_digests", None)
    if digests and len(digests) > 1:  # checked equal by the trainer
        train_metrics["embedding_statistics_digest_per_rank"] = digests
    if resume:  # train_loss is the whole run's; the times and speeds are this process's
        train_metrics["resumed_from_checkpoint"] = Path(resume).name
    trainer.save_model()  # model + processor, with code and auto_map
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()


def evaluate(trainer, datasets, stages, output_dir: Path) -> dict:
    """The metrics of the validation (`eval_`) and test (`test_`) splits the stages ask for, each saved."""
    results = {}
    for split, prefix, wanted in (("validation", "eval", stages[1]), ("test", "test", stages[2])):
        if wanted:
            metrics = evaluate_split(trainer, datasets[split], prefix, output_dir)
            trainer.save_metrics(prefix, metrics)
            results.update(metrics)
    logger.info("Results: " + json.dumps({k: v for k, v in results.items() if any(
        name in k for name in ("f1", "acc", "ccc"))}, indent=1))
    return results


def publish(model, data_args, training_args, results, report, label_names, output_dir: Path, push: bool) -> None:
    """The model card (from the measured results) and, with `push`, one Hub commit of the run folder."""
    repo_id = training_args.hub_model_id or output_dir.name
    details = "".join(f", {name} {value}" for name, value in (("label set", data_args.label_set),
                                                              ("fold", data_args.fold)) if value is not None)
    write_model_card(output_dir, model, dataset=data_args.dataset, label_names=label_names, results=results,
                     training_args=training_args, data_report=report, repo_id=repo_id, dataset_details=details)
    if push:  # model, processor, code, card and results in one commit; checkpoints stay local
        commit = hub.push_to_hub(output_dir, repo_id, token=training_args.hub_token,
                                 private=training_args.hub_private_repo)
        logger.info(f"Pushed to {commit.commit_url}")


def launched_processes() -> int:
    """How many processes `torchrun` / `accelerate launch` started (1 for a plain `python run_erc.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_processes(training_args) -> None:
    """Refuses a multi-process launch that `Trainer` would not train as one distributed run (each process would
    train its own copy on all the data and write the same files)."""
    from transformers.training_args import ParallelMode

    if launched_processes() > 1 and (training_args.parallel_mode != ParallelMode.DISTRIBUTED
                                     or training_args.world_size != launched_processes()):
        raise MisterEError(f"{launched_processes()} processes were launched, but the training arguments set up "
                           f"{training_args.parallel_mode.value} training in {training_args.world_size}; on CPUs give "
                           "--use_cpu true (and --ddp_backend gloo).")


def main(argv: list[str] | None = None):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    if launched_processes() > 1 and not torch.cuda.is_available():  # several CPU processes: DDP over gloo
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets
    model_args, data_args, training_args, given, asked = parse_arguments(argv)
    check_processes(training_args)
    if not training_args.should_log:  # in several processes, the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
        transformers.utils.logging.set_verbosity_error()
    import_plugins(model_args.plugins)
    HEADS[model_args.head], LOADERS[data_args.dataset]  # noqa: B018 - unknown names: errors listing the registered
    saved = saved_model_config(model_args)
    stages = requested_stages(asked)
    check_arguments(model_args, data_args, training_args, given, stages, saved)
    head = saved.head if saved is not None else model_args.head
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # one upload at the end, not per save
    with training_args.main_process_first(desc="finding the checkpoint to resume from"):
        resume = find_resume(training_args, output_dir) if stages[0] else None  # the main one moves aside

    datasets, report, label_names, label_columns, stages = prepare_data(data_args, training_args, given, asked,
                                                                        stages, saved, head, output_dir)
    model, processor = build_model(model_args, label_names)
    check_training_arguments(training_args, build_compute_metrics(label_names, model.expert_names, head=model.head),
                             training=stages[0], data_collator=DataCollatorForConversations(processor),
                             loss_terms=list(model.loss_weights))
    if resume:  # before any compute: a checkpoint of other settings is refused (the trainer checks again)
        check_resume_settings(resume, model.config, training_args)
    finetuning = {}
    if stages[0] and model_args.backbone_finetuning != "none":
        for modality in model.config.modalities:
            finetuning[modality] = finetune_backbone(model, processor, modality, datasets, method=model_args.backbone_finetuning,
                              epochs=model_args.finetuning_epochs, learning_rate=model_args.finetuning_learning_rate,
                              lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                              output_dir=output_dir / f"finetuning-{modality}", seed=training_args.seed,
                              gradient_checkpointing=training_args.gradient_checkpointing,
                              bf16=training_args.bf16, fp16=training_args.fp16, use_cpu=training_args.use_cpu)
    datasets, timings = extract(model, processor, datasets, model_args, data_args, report, output_dir, label_names,
                                label_columns, save=training_args.should_save)
    for modality, metrics in finetuning.items():  # recorded with the training metrics
        timings.update({f"finetuning_{modality}_{name}": metrics[name] for name in ("train_runtime", "train_loss",
                                                                                   "epoch") if name in metrics})
    callbacks = [EarlyStoppingCallback(training_args.early_stopping_patience)] \
        if stages[0] and training_args.early_stopping_patience else []
    trainer = build_trainer(model, training_args, datasets.get("train"),
                            datasets.get("validation") if stages[0] else None, processor, callbacks)
    if stages[0]:
        train(trainer, resume, timings)
    results = evaluate(trainer, datasets, stages, output_dir)
    if stages[0] and training_args.should_save:  # without training the model is the saved one, with its own card
        publish(model, data_args, training_args, results, report, label_names, output_dir, push)


def run(argv: list[str] | None = None) -> int:
    """`main(argv)`, with a problem the user can fix (a `MisterEError`: bad arguments or data, labels that cannot
    train, a non-finite loss, an incomplete checkpoint) reported as one line on stderr and exit status 1."""
    try:
        main(argv)
    except (MisterEError, StrictDataclassError) as error:  # config settings are checked by strict dataclasses
        message = " ".join(str(error).split())
        logger.error(message)
        print(f"run_erc.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
