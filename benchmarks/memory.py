#!/usr/bin/env python
"""Peak memory (RSS) of MiSTER-E (Whisper tiny.en + MiniLM-L6) in typical uses, each in its own process.

- baseline: a process that has imported torch and transformers, nothing more;
- load: the same, plus MiSTER-E built from both backbones and its processor;
- inference: load, then one conversation of EmoDB utterances (10 by default) through processor + model;
- head training: load, cached EmoDB embeddings (speaker fold 0, training speakers), one epoch of `MisterETrainer`
  on the head (frozen backbones).

Reported against the model's size: parameter counts and bytes of weights.

    python benchmarks/memory.py            # full sizes
    python benchmarks/memory.py --quick    # fewer utterances
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import tempfile

from common import (REPO_ROOT, add_asset_args, base_parser, current_rss_bytes, emodb_clips, emodb_dir,
                    head_training_arguments, main_guard, minilm_path, run_in_child, setup, whisper_path, write_results)


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    add_asset_args(parser, "whisper", "minilm", "emodb")
    parser.add_argument("--utterances", type=int, default=None,
                        help="Inference: utterances in the conversation (default 10; 4 with --quick).")
    parser.add_argument("--train-conversations", type=int, default=None,
                        help="Training: keep only this many training clips (default: all of fold 0; 16 with --quick).")
    parser.add_argument("--cache-dir", default="benchmarks/results/embedding-cache",
                        help="Embedding cache folder (relative: to the repository root). Reused across runs.")
    parser.add_argument("--temp-cache", action="store_true", help="Use a fresh temporary cache instead (re-extracts).")
    args = parser.parse_args()
    if args.utterances is None:
        args.utterances = 4 if args.quick else 10
    if args.train_conversations is None and args.quick:
        args.train_conversations = 16
    return args


# ----------------------------------------------------------------------------------------- child processes
def _threads(options):
    import torch

    if options.get("threads") is not None:
        torch.set_num_threads(options["threads"])


def child_baseline(options: dict) -> dict:
    import torch  # noqa: F401
    import transformers

    transformers.PreTrainedModel  # resolve the lazy module, as any model code does
    _threads(options)
    return {"rss_end": current_rss_bytes()}


def _load(options: dict):
    from mister_e_hf import MisterEModel, MisterEProcessor

    model = MisterEModel.from_backbones(options["whisper"], options["minilm"], freeze_speech_backbone=True,
                                        freeze_text_backbone=True, id2label=dict(enumerate(options["labels"])),
                                        speech_trim_padding=False)  # as measured
    return model, MisterEProcessor.from_backbones(options["whisper"], options["minilm"])


def _size(model) -> dict:
    def count(module):
        params = list(module.parameters())
        return {"parameters": sum(p.numel() for p in params),
                "weight_bytes": sum(p.numel() * p.element_size() for p in params)
                + sum(b.numel() * b.element_size() for b in module.buffers())}

    backbone_names = ("speech_backbone.", "text_backbone.")
    head = [p for n, p in model.named_parameters() if not n.startswith(backbone_names)]
    return {
        "speech_backbone": count(model.speech_backbone),
        "text_backbone": count(model.text_backbone),
        "head": {"parameters": sum(p.numel() for p in head),
                 "weight_bytes": sum(p.numel() * p.element_size() for p in head)},
        "total": count(model),
    }


def child_load(options: dict) -> dict:
    _threads(options)
    model, _ = _load(options)
    return {"rss_end": current_rss_bytes(), "size": _size(model), "dtype": str(model.dtype)}


def child_inference(options: dict) -> dict:
    import torch

    _threads(options)
    model, processor = _load(options)
    model.eval()
    rss_loaded = current_rss_bytes()
    conversation = [{"audio": c["path"], "text": c["text"]} for c in options["clips"]]
    with torch.no_grad():
        inputs = processor(conversations=[conversation], return_tensors="pt")
        outputs = model(**inputs)
    return {"rss_loaded": rss_loaded, "rss_end": current_rss_bytes(), "logits_shape": list(outputs.logits.shape),
            "input_bytes": sum(v.numel() * v.element_size() for v in inputs.values())}


def _emodb_train(options: dict):
    from datasets import DatasetDict, disable_progress_bars
    from mister_e_hf.data import load_corpus

    disable_progress_bars()
    datasets, _ = load_corpus("emodb", data_dir=options["emodb"], fold=0)
    train = datasets["train"]
    if options["train_conversations"] is not None:
        train = train.select(range(min(options["train_conversations"], len(train))))
    return DatasetDict({"train": train})


def child_training(options: dict) -> dict:
    from mister_e_hf.cache import add_cached_embeddings
    from mister_e_hf.data import DataCollatorForConversations
    from mister_e_hf.trainer import MisterETrainer

    _threads(options)
    model, processor = _load(options)
    datasets, stats = add_cached_embeddings(model, processor, _emodb_train(options), options["cache_dir"])
    rss_loaded = current_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="mister-e-bench-") as output_dir:
        trainer = MisterETrainer(model=model, args=head_training_arguments(output_dir, num_train_epochs=1, use_cpu=True),
                                 train_dataset=datasets["train"], data_collator=DataCollatorForConversations(processor))
        result = trainer.train()
    return {"rss_loaded": rss_loaded, "rss_end": current_rss_bytes(), "conversations": len(datasets["train"]),
            "steps": result.global_step, "cache_misses": stats.utterances_embedded}


# ---------------------------------------------------------------------------------------------------- main
def main():
    args = parse_args()
    setup(args)
    whisper, minilm, emodb = str(whisper_path(args)), str(minilm_path(args)), str(emodb_dir(args))
    clips = emodb_clips(emodb_dir(args))
    labels = sorted({c["label"] for c in clips})
    step = max(1, len(clips) // args.utterances)
    temp = tempfile.TemporaryDirectory(prefix="mister-e-cache-") if args.temp_cache else None
    cache_dir = temp.name if temp else str(REPO_ROOT / args.cache_dir if not os.path.isabs(args.cache_dir)
                                           else args.cache_dir)
    options = {"whisper": whisper, "minilm": minilm, "emodb": emodb, "labels": labels, "threads": args.threads,
               "clips": clips[::step][: args.utterances], "cache_dir": cache_dir,
               "train_conversations": args.train_conversations}

    # fill the embedding cache first (in a child too, so that this process stays small)
    fill, _ = run_in_child(child_fill_cache, options)

    runs = {}
    for name, fn in (("baseline", child_baseline), ("load", child_load), ("inference", child_inference),
                     ("head_training", child_training)):
        result, peak = run_in_child(fn, options)
        result["peak_rss_bytes"] = peak
        runs[name] = result
        print(f"{name}: peak RSS {peak / 2**20:.0f} MiB", flush=True)
    if temp:
        temp.cleanup()

    size = runs["load"]["size"]
    weight_bytes = size["total"]["weight_bytes"]
    base = runs["baseline"]["peak_rss_bytes"]
    mib = 2 ** 20
    descriptions = {
        "baseline": "import torch + transformers",
        "load": "+ load MiSTER-E (Whisper tiny.en encoder + MiniLM) and processor",
        "inference": f"+ one conversation of {len(options['clips'])} EmoDB utterances (no_grad)",
        "head_training": f"+ one head epoch on cached embeddings ({runs['head_training']['conversations']} EmoDB "
                         f"clips, fold 0)",
    }
    rows = []
    for name, r in runs.items():
        above = r["peak_rss_bytes"] - base
        rows.append([name, descriptions[name], r["peak_rss_bytes"] / mib, above / mib,
                     above / weight_bytes if name != "baseline" else "-"])
        r["above_baseline_bytes"] = above
        r["above_baseline_over_weight_bytes"] = above / weight_bytes
    size_rows = [[part, f"{size[part]['parameters']:,}", size[part]["weight_bytes"] / mib]
                 for part in ("speech_backbone", "text_backbone", "head", "total")]
    results = {"runs": runs, "model_size": size, "dtype": runs["load"]["dtype"], "cache_fill": fill}
    notes = [
        "Each scenario runs in a fresh process started with multiprocessing 'spawn'; its peak RSS is its own "
        "`getrusage(RUSAGE_SELF).ru_maxrss` at the end (imports included).",
        "'above baseline' = peak minus the baseline's peak; '/ weights' divides it by the bytes of all the model's "
        "weights (parameters + buffers, float32).",
        "Loading goes through `WhisperModel.from_pretrained` and keeps only the encoder, so the load peak also holds "
        "Whisper's decoder for a while; the inference peak includes activations of "
        f"{len(options['clips'])} x 30-s padded Whisper inputs (1,500 frames each) in one backbone call "
        "(`backbone_chunk_size=None`).",
        f"Training: the embedding cache under {'a temporary folder' if temp else args.cache_dir} was filled beforehand "
        f"({fill['cache_misses']} utterances extracted then, {runs['head_training']['cache_misses']} in the measured "
        "process).",
    ]
    write_results(args, "memory", "Peak memory (RSS) of MiSTER-E on Whisper tiny.en + MiniLM", results, [
        ("Peak RSS by scenario", ["scenario", "what the process does", "peak RSS MiB", "above baseline MiB",
                                  "above baseline / weight bytes"], rows),
        ("Model size", ["part", "parameters", "weights MiB"], size_rows),
    ], notes)


def child_fill_cache(options: dict) -> dict:
    from mister_e_hf.cache import add_cached_embeddings

    _threads(options)
    model, processor = _load(options)
    _, stats = add_cached_embeddings(model, processor, _emodb_train(options), options["cache_dir"])
    return {"cache_misses": stats.utterances_embedded, "extraction_seconds": stats.extraction_seconds}


if __name__ == "__main__":
    main_guard(main)
