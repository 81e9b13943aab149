"""The `mister-e` command: predict, evaluate and plot gate weights with a trained model folder.

    mister-e predict --model runs/meld conversations.jsonl -o predictions.jsonl
    mister-e evaluate --model runs/meld --dataset meld --data_dir data/meld --split test
    mister-e plot-gates --model runs/meld conversation.json -o gates.png
    mister-e demo --model runs/meld                      # a web page (pip install "mister_e_hf[demo]")

Bad input ends with one line naming the file, conversation and utterance, a non-zero exit status, and no output
file (outputs are written to a temporary file and moved into place only when complete). Output is strict JSON: a
prediction that is not a finite number is an error, never a `NaN` in the file.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from .atomic import atomic_output, strict_json


class CliError(Exception):
    """An error the user can fix; printed as one line."""


def _resolve(utterance: dict, folder: Path) -> dict:
    """Relative audio and image paths resolved against the conversation file's folder (blank values stay blank:
    an absent modality)."""
    resolved = dict(utterance)
    for key in ("audio", "image"):
        value = utterance.get(key)
        if isinstance(value, str) and value.strip() and not os.path.isabs(value):
            resolved[key] = str(folder / value)
    return resolved


def _conversation(value, where: str) -> tuple[str | None, list[dict]]:
    """`(conversation_id, utterances)` from a list of utterances or `{"conversation_id": ..., "utterances": [...]}`."""
    if isinstance(value, dict):
        if "utterances" not in value:
            raise CliError(f"{where}: a conversation object needs an 'utterances' list")
        conversation_id, value = value.get("conversation_id"), value["utterances"]
    else:
        conversation_id = None
    if not isinstance(value, list) or not value:
        raise CliError(f"{where}: a conversation must be a non-empty list of utterances")
    for turn, utterance in enumerate(value):
        if not isinstance(utterance, dict):
            raise CliError(f"{where}, utterance {turn}: an utterance must be an object with 'text' and/or 'audio'")
    return conversation_id, value


def read_conversations(path: str, resolve_paths: bool = True) -> list[tuple[str, str, list[dict]]]:
    """`(position in the file, conversation_id, utterances)` of a JSONL file (one conversation per line) or a JSON
    file (one conversation, or a list of them), with relative audio and image paths resolved against the file's
    folder (`resolve_paths=False`: left as written)."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"{path}: no such file")
    line = None
    try:
        if file.suffix == ".jsonl":
            items = []
            with open(file, encoding="utf-8-sig") as f:
                for line, text in enumerate(f, 1):
                    if text.strip():
                        items.append((f"{path}, line {line}", json.loads(text)))
        else:
            value = json.loads(file.read_text(encoding="utf-8-sig"))
            if not isinstance(value, (dict, list)):
                raise CliError(f"{path}: holds a JSON {type(value).__name__}, not a conversation (a list of "
                               "utterances, or an object with 'utterances') or a list of conversations")
            single = isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)
                                                 and "utterances" not in value[0])
            items = [(path, value)] if single else [(f"{path}, conversation {i}", v) for i, v in enumerate(value)]
    except json.JSONDecodeError as error:
        where = f"line {line}" if line is not None else f"line {error.lineno}"
        raise CliError(f"{path}: not valid JSON ({error.msg}, {where})") from None
    except RecursionError:
        raise CliError(f"{path}: nested too deeply to be a conversation file") from None
    except UnicodeDecodeError as error:
        raise CliError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                       "save it as UTF-8") from None
    if not items:
        raise CliError(f"{path}: no conversations")
    conversations = []
    for index, (position, value) in enumerate(items):
        conversation_id, utterances = _conversation(value, position)
        conversation_id = str(conversation_id) if conversation_id is not None else str(index)
        conversations.append((position, conversation_id,
                              [_resolve(u, file.parent) for u in utterances] if resolve_paths else utterances))
    return conversations


def check_output(path: str | None, plot: bool = False) -> None:
    """Refuses, before any work, an output path that is a folder, or a plot path whose suffix is no image format."""
    if path is None:
        return
    if Path(path).is_dir():
        raise CliError(f"{path}: is a folder; give a file name for the output")
    if plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        formats = sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())
        if Path(path).suffix.lstrip(".").lower() not in formats:
            raise CliError(f"{path}: a plot is written as one of {', '.join('.' + f for f in formats)}; give the "
                           "file a suffix")


def load(model_path: str):
    """(model, processor) from a saved model folder."""
    import mister_e_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor

    if not Path(model_path).is_dir() or not (Path(model_path) / "config.json").exists():
        raise CliError(f"{model_path}: not a saved model folder (no config.json)")
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CliError(f"{model_path}/config.json is not valid JSON ({str(error).splitlines()[0]}); the folder is "
                       "damaged: save the model again") from None
    if not isinstance(config, dict) or config.get("model_type") != "mister-e":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CliError(f"{model_path}: not a MiSTER-E model (its config.json has model_type {kind!r})")
    model, processor = AutoModel.from_pretrained(model_path).eval(), AutoProcessor.from_pretrained(model_path)
    model.check_processor(processor)
    return model, processor


def _recognizer(model_path: str):
    from transformers import pipeline

    from .pipeline import TASK

    model, processor = load(model_path)
    return pipeline(TASK, model=model, processor=processor)


def _run(recognizer, conversations, batch_size: int, asr_model=None) -> list[list[dict]]:
    """Pipeline outputs per conversation, in batches; bad input is reported with its place in the file."""
    from .processing_mister_e import ConversationInputError

    options = {"asr_model": asr_model} if asr_model else {}
    outputs = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        try:
            outputs.extend(recognizer([utterances for _, _, utterances in chunk], batch_size=len(chunk), **options))
        except ConversationInputError as error:
            if error.conversation is None or error.conversation >= len(chunk):
                raise CliError(str(error)) from None
            position, conversation_id, _ = chunk[error.conversation]
            utterance = f", utterance {error.utterance}" if error.utterance is not None else ""
            raise CliError(f"{position} (conversation {conversation_id!r}{utterance}): {error.detail}") from None
    return outputs


def predict(args) -> None:
    check_output(args.output)
    conversations = read_conversations(args.conversations)
    outputs = _run(_recognizer(args.model), conversations, args.batch_size, args.asr_model)
    lines = [
        strict_json({"conversation_id": conversation_id, "turn": turn, **prediction}, ensure_ascii=False)
        for (_, conversation_id, _), predictions in zip(conversations, outputs)
        for turn, prediction in enumerate(predictions)
    ]
    if args.output:
        with atomic_output(args.output) as temporary:
            Path(temporary).write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def evaluate(args) -> None:
    """The metrics of a saved model on a corpus split, by the same path as `run_erc.py --do_eval`: `Trainer.predict`
    and the model's head's metrics (classification or regression alike)."""
    from .data import load_corpus, loader_arguments
    from .evaluation import evaluate_split, evaluation_trainer, label_names

    check_output(args.output)
    model, processor = load(args.model)
    options = loader_arguments(args.dataset, {"label_set": "--label_set", "fold": "--fold"}, data_dir=args.data_dir,
                               label_set=args.label_set, fold=args.fold)
    datasets, _ = load_corpus(args.dataset, **options)
    if args.split not in datasets:
        raise CliError(f"{args.dataset} has no split {args.split!r}; it has {sorted(datasets)}")
    dataset, names = datasets[args.split], label_names(model)
    if model.head.target == "classes":
        corpus_labels = dataset.features["labels"].feature.names
        if corpus_labels != names:
            raise CliError(f"{args.model} predicts {names}, but {args.dataset} is labelled {corpus_labels}")
    elif missing := [name for name in names if name not in dataset.column_names]:
        raise CliError(f"{args.model} predicts the dimensions {names}, but {args.dataset} has no column {missing}")
    metrics = evaluate_split(evaluation_trainer(model, processor, args.batch_size, disable_tqdm=True), dataset,
                             args.split, confusion_matrix=True)
    results = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}
    text = strict_json(results, indent=1)
    if args.output:
        with atomic_output(args.output) as temporary:
            Path(temporary).write_text(text + "\n", encoding="utf-8")
    print(text)


def plot_gates(args) -> None:
    import numpy as np

    from .plotting import plot_gate_weights_along_turns

    check_output(args.output, plot=True)
    conversations = read_conversations(args.conversation)
    if len(conversations) != 1:
        raise CliError(f"{args.conversation}: plot-gates takes one conversation, found {len(conversations)}")
    recognizer = _recognizer(args.model)
    (predictions,) = _run(recognizer, conversations, 1, args.asr_model)
    experts = recognizer.model.expert_names
    gates = [[np.mean(p["gate_weights"][e]) for e in experts] for p in predictions]  # routed per dimension: mean
    labels = [f"{t}: {p['label']}" if "label" in p else str(t) for t, p in enumerate(predictions)]
    with atomic_output(args.output) as temporary:
        plot_gate_weights_along_turns(gates, experts, temporary, labels=labels)
    print(f"wrote {args.output}")


def demo(args) -> None:
    from .demo import launch

    launch(args.model, host=args.host, port=args.port, examples=args.examples, audio_dirs=args.audio_dir,
           asr_model=args.asr_model)


def _loaders() -> list[str]:
    from .registry import LOADERS, load_builtins

    load_builtins()
    return list(LOADERS)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mister-e", description="Emotion recognition in conversations with MiSTER-E.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="predict the emotion of every utterance; JSONL out, one line per utterance")
    p.add_argument("conversations", help="JSONL (one conversation per line) or JSON file")
    p.add_argument("--model", required=True, help="a saved model folder")
    p.add_argument("-o", "--output", help="write JSONL here instead of standard output")
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--asr_model", help="speech-recognition model for utterances with audio but no text")
    p.set_defaults(run=predict)

    p = commands.add_parser("evaluate", help="the training metrics of a model on a corpus split")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, help="a registered corpus loader: " + ", ".join(_loaders()))
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--label_set")
    p.add_argument("--fold", type=int)
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("-o", "--output", help="also write the metrics as JSON here")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("plot-gates", help="plot the experts' gate weights along the turns of a conversation")
    p.add_argument("conversation", help="JSON file with one conversation")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", required=True, help="PNG file")
    p.add_argument("--asr_model")
    p.set_defaults(run=plot_gates)

    p = commands.add_parser("demo", help="a web page to try the model on a conversation (Gradio)")
    p.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=7860)
    p.add_argument("--examples", help="JSONL of example conversations (default: the model folder's examples.jsonl)")
    p.add_argument("--audio_dir", action="append", default=None, metavar="DIR",
                   help="a folder whose audio a visitor's conversation file may name (repeatable); default: any "
                        "file when serving on 127.0.0.1, none otherwise (audio then comes as uploads)")
    p.add_argument("--asr_model", help="speech-recognition model for turns with audio but no text")
    p.set_defaults(run=demo)
    return parser


def error_line(error: Exception) -> str:
    """The one line `mister-e` prints for an error: the message of one the user can fix (its first line), or, for
    anything else, its type and message."""
    from huggingface_hub.errors import StrictDataclassError

    if isinstance(error, CliError):
        return f"mister-e: error: {error}"
    if isinstance(error, (ValueError, OSError, StrictDataclassError)):  # corpus, file and config errors
        lines = str(error).splitlines()
        return f"mister-e: error: {lines[0] if lines else type(error).__name__}"
    lines = str(error).splitlines()
    return f"mister-e: error: unexpected {type(error).__name__}" + (f": {lines[0]}" if lines else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from huggingface_hub.errors import StrictDataclassError
    from transformers.utils import logging

    logging.set_verbosity_error()  # only our results and one-line errors on the terminal
    logging.disable_progress_bar()
    try:
        args.run(args)
    except (CliError, ValueError, OSError, StrictDataclassError) as error:  # corpus, file, config errors: one line
        print(error_line(error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
