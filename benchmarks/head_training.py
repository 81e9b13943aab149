#!/usr/bin/env python
"""Seconds per epoch and peak memory of training MiSTER-E's head on cached MiniLM embeddings of MELD, at 1x, 2x
and 4x the training data.

The text backbone (MiniLM-L6) is frozen; utterance embeddings come from the embedding cache
(`add_cached_embeddings`, filled once by this script), then `MisterETrainer` trains the context layers, experts and
gate for one epoch with no evaluation and no saving, as `examples/run_erc.py --freeze_backbones` does. Each data
scale (the train split duplicated with `datasets.concatenate_datasets`) runs in its own child process so that its
peak RSS is its own. Expected: s/epoch scales ~1 : 2 : 4.

    python benchmarks/head_training.py            # full MELD train split
    python benchmarks/head_training.py --quick    # a few conversations
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import tempfile
import time

from common import (REPO_ROOT, add_asset_args, base_parser, current_rss_bytes, head_training_arguments, main_guard,
                    meld_dir, minilm_path, run_in_child, setup, write_results)


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    add_asset_args(parser, "minilm", "meld")
    parser.add_argument("--scales", default="1,2,4", help="Data multiples of the train split.")
    parser.add_argument("--conversations", type=int, default=None,
                        help="Use only the first N train conversations (default: all 1,038; 24 with --quick).")
    parser.add_argument("--batch-size", type=int, default=16, help="Conversations per training batch (run_erc's default).")
    parser.add_argument("--cache-dir", default="benchmarks/results/embedding-cache",
                        help="Embedding cache folder (relative: to the repository root). Reused across runs.")
    parser.add_argument("--temp-cache", action="store_true", help="Use a fresh temporary cache instead (re-extracts).")
    parser.add_argument("--share-buffers", action="store_true",
                        help="Keep the duplicated data as views of the same Arrow buffers (concatenate_datasets does "
                             "not copy) instead of copying them, so memory does not grow with the copies.")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.conversations is None and args.quick:
        args.conversations = 24
    args.scales = [int(s) for s in args.scales.split(",")]
    return args


def load_train(meld: str, conversations: int | None):
    from datasets import DatasetDict, disable_progress_bars
    from mister_e_hf.data import load_corpus

    disable_progress_bars()
    datasets, _ = load_corpus("meld", data_dir=meld)
    train = datasets["train"]
    if conversations is not None:
        train = train.select(range(min(conversations, len(train))))
    return DatasetDict({"train": train}), train.features["labels"].feature.names


def build(minilm: str, label_names):
    from mister_e_hf import MisterEModel, MisterEProcessor

    model = MisterEModel.from_backbones(None, minilm, freeze_text_backbone=True,
                                        id2label=dict(enumerate(label_names)))
    return model, MisterEProcessor.from_backbones(None, minilm)


def training_arguments(output_dir: str, batch_size: int, seed: int, max_steps: int = -1):
    """One epoch (or `max_steps`) of the head with run_erc.py's defaults, at `batch_size`."""
    return head_training_arguments(output_dir, num_train_epochs=1, max_steps=max_steps,
                                   per_device_train_batch_size=batch_size, seed=seed, use_cpu=True)


def train_child(options: dict, scale: int) -> dict:
    """In a fresh process: load the cached embeddings, duplicate the data `scale` times, time `repeats` epochs."""
    import torch
    from datasets import concatenate_datasets

    from mister_e_hf.cache import add_cached_embeddings
    from mister_e_hf.data import DataCollatorForConversations
    from mister_e_hf.trainer import MisterETrainer

    if options["threads"] is not None:
        torch.set_num_threads(options["threads"])
    datasets, label_names = load_train(options["meld"], options["conversations"])
    model, processor = build(options["minilm"], label_names)
    datasets, stats = add_cached_embeddings(model, processor, datasets, options["cache_dir"])
    train = concatenate_datasets([datasets["train"]] * scale)
    if not options["share_buffers"]:  # a real copy, as genuinely larger data would take
        train = train.map(lambda batch: batch, batched=True, keep_in_memory=True)
    collator = DataCollatorForConversations(processor)
    rss_loaded = current_rss_bytes()
    seconds, runtimes, steps = [], [], None
    with tempfile.TemporaryDirectory(prefix="mister-e-bench-") as output_dir:
        warm = MisterETrainer(model=model, args=training_arguments(output_dir, options["batch_size"], options["seed"],
                                                                   max_steps=2),
                              train_dataset=train, data_collator=collator)
        warm.train()  # warm-up: first-call allocations, kernels
        del warm
        for _ in range(options["repeats"]):
            trainer = MisterETrainer(model=model, args=training_arguments(output_dir, options["batch_size"],
                                                                          options["seed"]),
                                     train_dataset=train, data_collator=collator)
            start = time.perf_counter()
            result = trainer.train()
            seconds.append(time.perf_counter() - start)
            runtimes.append(result.metrics["train_runtime"])
            steps = result.global_step
            del trainer
    head = [p for n, p in model.named_parameters() if not n.startswith("text_backbone.")]
    return {
        "scale": scale,
        "conversations": len(train),
        "utterances": int(sum(train["num_turns"])),
        "steps_per_epoch": steps,
        "seconds_per_epoch_runs": seconds,
        "trainer_train_runtime_runs": runtimes,
        "rss_after_loading_bytes": rss_loaded,
        "dataset_bytes_in_memory": train.data.nbytes,
        "cache_hits": stats.cached_utterances,
        "cache_misses": stats.utterances_embedded,
        "trainable_parameters": sum(p.numel() for p in head if p.requires_grad),
    }


def main():
    import statistics

    args = parse_args()
    setup(args)
    meld, minilm = str(meld_dir(args)), str(minilm_path(args))
    temp = tempfile.TemporaryDirectory(prefix="mister-e-cache-") if args.temp_cache else None
    cache_dir = temp.name if temp else str(REPO_ROOT / args.cache_dir if not os.path.isabs(args.cache_dir)
                                           else args.cache_dir)

    # fill the embedding cache once, in this process (a later run with the same cache extracts nothing)
    from mister_e_hf.cache import add_cached_embeddings

    datasets, label_names = load_train(meld, args.conversations)
    model, processor = build(minilm, label_names)
    start = time.perf_counter()
    _, stats = add_cached_embeddings(model, processor, datasets, cache_dir)
    fill_seconds = time.perf_counter() - start
    del model, processor, datasets

    options = {"meld": meld, "minilm": minilm, "conversations": args.conversations, "cache_dir": cache_dir,
               "batch_size": args.batch_size, "seed": args.seed, "repeats": args.repeats, "threads": args.threads,
               "share_buffers": args.share_buffers}
    runs = []
    for scale in args.scales:
        result, peak = run_in_child(train_child, options, scale)
        result["peak_rss_bytes"] = peak
        result["seconds_per_epoch"] = statistics.median(result["seconds_per_epoch_runs"])
        runs.append(result)
        print(f"{scale}x: {result['seconds_per_epoch']:.3f} s/epoch, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    if temp:
        temp.cleanup()

    base = next((r for r in runs if r["scale"] == 1), runs[0])
    for r in runs:
        r["train_runtime"] = statistics.median(r["trainer_train_runtime_runs"])
    for r in runs:
        r["seconds_per_epoch_per_1x"] = r["seconds_per_epoch"] / r["scale"]
        r["time_ratio_to_1x"] = r["seconds_per_epoch"] / base["seconds_per_epoch"] * base["scale"]
        r["train_runtime_ratio_to_1x"] = r["train_runtime"] / base["train_runtime"] * base["scale"]
        r["peak_rss_ratio_to_1x"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
    results = {"embedding_cache": {"fill_seconds": fill_seconds, "utterances_embedded": stats.utterances_embedded,
                                   "cached_utterances": stats.cached_utterances,
                                   "cache_dir": "temporary" if temp else args.cache_dir},
               "runs": runs}
    mib = 2 ** 20
    rows = [[f"{r['scale']}x", r["conversations"], r["utterances"], r["steps_per_epoch"], r["seconds_per_epoch"],
             r["seconds_per_epoch_per_1x"], r["time_ratio_to_1x"], r["train_runtime"],
             r["train_runtime_ratio_to_1x"], r["peak_rss_bytes"] / mib,
             (r["peak_rss_bytes"] - (r["rss_after_loading_bytes"] or 0)) / mib, r["dataset_bytes_in_memory"] / mib]
            for r in runs]
    notes = [
        f"Trainable head parameters: {runs[0]['trainable_parameters']:,} (MiniLM frozen, not trained). "
        f"Batch {args.batch_size} conversations, length-grouped sampling, AdamW lr 1e-3 (run_erc.py's defaults), "
        "one epoch, no evaluation, no checkpoints, no logging. Each epoch is timed with a new `MisterETrainer` "
        "after a 2-step warm-up; median of the repeats. 's/epoch' is the wall time of `trainer.train()`; the "
        "Trainer's own `train_runtime` leaves out part of its set-up (optimizer, data loader), a fixed cost per "
        "call that makes small data scale sub-linearly.",
        "Each scale runs in its own spawned process: the peak RSS includes the interpreter, torch + transformers "
        "imports and the MiniLM weights (the model holds its frozen backbone), so most of it does not depend on the "
        "data. 'above loaded' = peak minus the RSS once data and model were loaded, i.e. what training itself adds.",
        "Duplicated data is " + ("kept as shared Arrow buffers (--share-buffers)." if args.share_buffers else
                                 "copied into new in-memory Arrow buffers, as genuinely larger data would be "
                                 "(concatenate_datasets alone shares the buffers)."),
        f"Embedding cache: {stats.utterances_embedded} utterances extracted, {stats.cached_utterances} read from the "
        f"cache, {fill_seconds:.1f} s (not part of the per-epoch times).",
    ]
    write_results(args, "head_training", "MiSTER-E head training on cached MiniLM embeddings (MELD)", results, [(
        "Seconds per epoch and peak RSS by data scale (expected time ratios ~1 : 2 : 4)",
        ["data", "conversations", "utterances", "steps", "s/epoch", "s/epoch per 1x", "time ratio to 1x",
         "Trainer train_runtime s", "its ratio to 1x", "peak RSS MiB", "peak above loaded MiB", "dataset MiB"],
        rows,
    )], notes)


if __name__ == "__main__":
    main_guard(main)
