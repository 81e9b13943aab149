#!/usr/bin/env python
"""Embedding extraction throughput of the toolkit (`mister_e_hf.cache.extract_embeddings`).

a) Toolkit vs bare backbone: utterances per second of `extract_embeddings` (processor + `embed_utterances`, frozen
   backbones) against the bare backbone forward on precomputed feature-extractor/tokenizer outputs, same batches in
   the same order; Whisper tiny.en on EmoDB clips (speech) and MiniLM-L6 on MELD utterances (text). Goal: ratio
   toolkit/bare >= 0.9. Also the split of the toolkit's time between the processor and the backbone.
b) Length-grouped vs naive batching: `extract_embeddings` (sorts by length) vs the same function with the sort
   disabled (original random order), on random noise of 0.5-8 s through a randomly initialised wav2vec2-base
   (layer-norm variant). Goal: speed-up >= 1.3x, same embeddings.
c) Whisper's 30-s padding: the Whisper tiny.en encoder on the standard 3000 mel frames vs on only the frames that
   cover the 2-s EmoDB clips (positional embeddings sliced); speed-up and how much the embeddings change.

    python benchmarks/extraction.py            # full sizes
    python benchmarks/extraction.py --quick    # smoke test
    python benchmarks/extraction.py --render benchmarks/results/extraction.json   # rewrite the .md only
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from extract_embeddings

import random
import tempfile
from pathlib import Path
from unittest import mock

from common import (add_asset_args, base_parser, emodb_clips, emodb_dir, load_audio_16k, main_guard, meld_dir,
                    minilm_path, rerender, setup, time_interleaved, whisper_path, write_results)


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    add_asset_args(parser, "whisper", "minilm", "emodb", "meld")
    parser.add_argument("--parts", default="a,b,c", help="Which parts to run, comma-separated.")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Utterances per backbone call in a) and b) (default 16, the toolkit's default; 4 with --quick).")
    parser.add_argument("--speech-utterances", type=int, default=None, help="a) EmoDB clips (default 64; 4 quick).")
    parser.add_argument("--text-utterances", type=int, default=None, help="a) MELD utterances (default 512; 32 quick).")
    parser.add_argument("--noise-utterances", type=int, default=None, help="b) noise clips (default 64; 8 quick).")
    parser.add_argument("--noise-seconds", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="b) clip lengths, uniform (default 0.5 8; 0.5 2 quick).")
    parser.add_argument("--whisper-clips", type=int, default=None, help="c) EmoDB clips (default 32; 4 quick).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="Rewrite the markdown of an earlier run from its JSON (no measuring).")
    args = parser.parse_args()
    quick = args.quick
    defaults = {"batch_size": (16, 4), "speech_utterances": (64, 4), "text_utterances": (512, 32),
                "noise_utterances": (64, 8), "noise_seconds": ([0.5, 8.0], [0.5, 2.0]), "whisper_clips": (32, 4)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    return args


# --------------------------------------------------------------------------------------------------------- a)
def toolkit_vs_bare(modality, model, processor, utterances, batch_size, repeats):
    """Times `extract_embeddings` against the bare backbone on the same batches; see the module docstring."""
    import numpy as np
    import torch
    from mister_e_hf.cache import extract_embeddings
    from mister_e_hf.pooling import mean_pool

    backbone = getattr(model, f"{modality}_backbone")
    sources = [text if modality == "text" else path for text, path in utterances]  # what extract_embeddings takes
    # the order extract_embeddings uses: sorted by length (characters of text, seconds of audio; stable)
    if modality == "speech":
        import soundfile

        def length(i):
            info = soundfile.info(utterances[i][1])
            return info.frames / info.samplerate
    else:
        def length(i):
            return len(utterances[i][0])
    order = sorted(range(len(utterances)), key=length)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

    if modality == "speech":
        extractor = processor.feature_extractor
        audio = {i: load_audio_16k(utterances[i][1], extractor.sampling_rate) for i in order}

        def features(batch):  # what the processor gives the backbone, from in-memory 16-kHz audio
            return extractor([audio[i] for i in batch], sampling_rate=extractor.sampling_rate,
                             return_attention_mask=True, return_tensors="pt")

        input_name = extractor.model_input_names[0]
        prepared = [features(b) for b in batches]
        bare_inputs = [{input_name: p[input_name]} for p in prepared]
    else:
        tokenizer = processor.tokenizer

        def features(batch):
            return tokenizer([utterances[i][0] for i in batch], padding=True, truncation=True,
                             max_length=processor.max_text_length, padding_side="right", return_tensors="pt")

        prepared = [features(b) for b in batches]
        bare_inputs = [dict(p) for p in prepared]

    last = {}

    def toolkit():
        last["vectors"] = extract_embeddings(model, processor, modality, sources, batch_size)

    @torch.no_grad()
    def bare():
        for inputs in bare_inputs:
            backbone(**inputs)

    def processor_only():
        for batch in batches:
            processor(conversations=[[{"text": utterances[i][0], "audio": utterances[i][1]}] for i in batch],
                      modalities=[modality])

    def features_only():
        for batch in batches:
            features(batch)

    first = batches[0]
    warmups = {
        "toolkit": lambda: extract_embeddings(model, processor, modality, [sources[i] for i in first], batch_size),
        "bare_backbone": torch.no_grad()(lambda: backbone(**bare_inputs[0])),
        "processor": lambda: processor(conversations=[[{"text": utterances[i][0], "audio": utterances[i][1]}]
                                                      for i in first], modalities=[modality]),
        "bare_features": lambda: features(first),
    }
    timings = time_interleaved({"toolkit": toolkit, "bare_backbone": bare, "processor": processor_only,
                                "bare_features": features_only}, repeats, warmups=warmups)

    # same embeddings? the bare outputs mean-pooled over the frames/tokens that cover real input
    with torch.no_grad():
        diffs = []
        for batch, inputs, raw in zip(batches, bare_inputs, prepared):
            hidden = backbone(**inputs).last_hidden_state
            if modality == "speech":
                frames = raw["attention_mask"].sum(-1)
                lengths = backbone._get_feat_extract_output_lengths(frames) if hasattr(
                    backbone, "_get_feat_extract_output_lengths") else frames
                mask = torch.arange(hidden.shape[1]) < torch.as_tensor(lengths).clamp(1, hidden.shape[1]).unsqueeze(1)
            else:
                mask = raw["attention_mask"].bool()
            pooled = mean_pool(hidden, mask)
            toolkit_vectors = torch.from_numpy(np.stack([last["vectors"][i] for i in batch]))
            diffs.append(float((pooled - toolkit_vectors).abs().max()))

    n = len(utterances)
    toolkit_s, bare_s = timings["toolkit"]["median_s"], timings["bare_backbone"]["median_s"]
    processor_s, features_s = timings["processor"]["median_s"], timings["bare_features"]["median_s"]
    return {
        "modality": modality,
        "backbone": model.config.backbone_config(modality).model_type,
        "utterances": n,
        "batch_size": batch_size,
        "toolkit_utt_per_s": n / toolkit_s,
        "bare_backbone_utt_per_s": n / bare_s,
        "ratio_toolkit_over_bare": bare_s / toolkit_s,
        "goal_ratio": 0.9,
        "processor_s": processor_s,
        "bare_features_s": features_s,
        "backbone_s": bare_s,
        "toolkit_s": toolkit_s,
        "processor_share_of_toolkit": processor_s / toolkit_s,
        "backbone_share_of_toolkit": bare_s / toolkit_s,
        "rest_share_of_toolkit": 1 - (processor_s + bare_s) / toolkit_s,
        "embeddings_max_abs_diff_toolkit_vs_bare": max(diffs),
        "timings": timings,
    }


def best_runs_ratio(result: dict) -> float:
    """Fastest bare run / fastest toolkit run, from the raw timings of `toolkit_vs_bare`."""
    return result["timings"]["bare_backbone"]["min_s"] / result["timings"]["toolkit"]["min_s"]


def part_a(args, results):
    from datasets import disable_progress_bars
    from mister_e_hf import MisterEModel, MisterEProcessor
    from mister_e_hf.data import load_corpus

    disable_progress_bars()
    whisper, minilm = whisper_path(args), minilm_path(args)
    clips = emodb_clips(emodb_dir(args))
    step = max(1, len(clips) // args.speech_utterances)  # spread over speakers and emotions
    speech_utterances = [(c["text"], c["path"]) for c in clips[::step][: args.speech_utterances]]
    meld, _ = load_corpus("meld", data_dir=str(meld_dir(args)))
    texts = [t for row in meld["train"]["texts"] for t in row]
    text_utterances = [(t, None) for t in random.Random(args.seed).sample(texts, min(args.text_utterances, len(texts)))]

    for modality, speech, text, utterances in (("speech", str(whisper), None, speech_utterances),
                                               ("text", None, str(minilm), text_utterances)):
        model = MisterEModel.from_backbones(speech, text, freeze_speech_backbone=True, freeze_text_backbone=True,
                                            id2label={0: "a", 1: "b"},  # the padded window the bare forward gets
                                            **({"speech_trim_padding": False} if speech else {})).eval()
        processor = MisterEProcessor.from_backbones(speech, text)
        result = toolkit_vs_bare(modality, model, processor, utterances, args.batch_size, args.repeats)
        path = Path(speech or text)
        result["backbone_path"] = path.parent.name if path.name == "model" else path.name  # the MiniLM wheel's folder
        results.setdefault("a_toolkit_vs_bare", []).append(result)
        del model



# --------------------------------------------------------------------------------------------------------- b)
def part_b(args, results):
    import numpy as np
    import soundfile
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from mister_e_hf import MisterEConfig, MisterEModel, MisterEProcessor
    from mister_e_hf import cache

    torch.manual_seed(args.seed)
    config = MisterEConfig(speech_config=Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True),
                           num_labels=4, freeze_speech_backbone=True)
    model = MisterEModel(config).eval()
    processor = MisterEProcessor(feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True))
    rate = processor.feature_extractor.sampling_rate
    rng = np.random.default_rng(args.seed)
    low, high = args.noise_seconds
    lengths = (rng.uniform(low, high, args.noise_utterances) * rate).astype(int)
    batch_size = args.batch_size

    def padded_samples(order):
        return sum(len(b) * max(lengths[i] for i in b)
                   for b in (order[s : s + batch_size] for s in range(0, len(order), batch_size)))

    with tempfile.TemporaryDirectory(prefix="mister-e-bench-") as folder:
        utterances = []
        for i, n in enumerate(lengths):
            path = os.path.join(folder, f"noise-{i:03d}.wav")
            soundfile.write(path, (0.1 * rng.standard_normal(n)).astype(np.float32), rate, subtype="FLOAT")
            utterances.append(path)
        out = {}

        def grouped():
            out["grouped"] = cache.extract_embeddings(model, processor, "speech", utterances, batch_size)

        def naive():  # the same function with every length equal: the stable sort keeps the random order
            with mock.patch.object(cache, "_length", lambda *_: 0.0):
                out["naive"] = cache.extract_embeddings(model, processor, "speech", utterances, batch_size)

        first = utterances[:batch_size]
        timings = time_interleaved({"length_grouped": grouped, "naive_random_order": naive}, args.repeats, warmups={
            "length_grouped": lambda: cache.extract_embeddings(model, processor, "speech", first, batch_size),
            "naive_random_order": lambda: cache.extract_embeddings(model, processor, "speech", first, batch_size),
        })
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out["grouped"], out["naive"]))
    scale = max(float(np.abs(a).max()) for a in out["grouped"])
    grouped_s, naive_s = timings["length_grouped"]["median_s"], timings["naive_random_order"]["median_s"]
    sorted_order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    result = {
        "backbone": "wav2vec2-base (random init, feat_extract_norm=layer, do_stable_layer_norm=True)",
        "parameters": sum(p.numel() for p in model.speech_backbone.parameters()),
        "utterances": len(lengths),
        "batch_size": batch_size,
        "seconds_range": [low, high],
        "audio_seconds_total": float(lengths.sum() / rate),
        "padding_factor_grouped": padded_samples(sorted_order) / float(lengths.sum()),
        "padding_factor_naive": padded_samples(list(range(len(lengths)))) / float(lengths.sum()),
        "grouped_s": grouped_s,
        "naive_s": naive_s,
        "speedup_grouped_over_naive": naive_s / grouped_s,
        "goal_speedup": 1.3,
        "embeddings_max_abs_diff": diff,
        "embeddings_max_abs_value": scale,
        "timings": timings,
    }
    results["b_length_grouping"] = result


def part_c(args, results):
    import torch
    import torch.nn.functional as F
    from transformers import AutoFeatureExtractor

    from mister_e_hf.backbones import encode_whisper_trimmed, load_backbone

    whisper = whisper_path(args)
    encoder = load_backbone(str(whisper)).eval()
    extractor = AutoFeatureExtractor.from_pretrained(str(whisper))
    clips = emodb_clips(emodb_dir(args))
    step = max(1, len(clips) // args.whisper_clips)
    clips = clips[::step][: args.whisper_clips]
    audio = [load_audio_16k(c["path"], extractor.sampling_rate) for c in clips]
    features = extractor(audio, sampling_rate=extractor.sampling_rate, return_attention_mask=True, return_tensors="pt")
    full = features["input_features"]  # (N, 80, 3000)
    real_frames = features["attention_mask"].sum(-1)  # mel frames that cover real audio (200 for 2 s)
    frames = int(real_frames.max())
    frames += frames % 2  # conv2 has stride 2
    trimmed = full[..., :frames].contiguous()

    with torch.no_grad():
        reference = encoder(input_features=full[:2]).last_hidden_state
        mine = encode_whisper_trimmed(encoder, full[:2], torch.full((2,), full.shape[-1])).last_hidden_state
        check = float((reference - mine).abs().max())
    if check > 1e-4:
        raise RuntimeError(f"The reimplemented Whisper encoder differs from transformers' by {check} on 3000 frames.")

    batch = args.batch_size
    chunks = [slice(s, s + batch) for s in range(0, len(clips), batch)]

    @torch.no_grad()
    def padded():
        return [encoder(input_features=full[c]).last_hidden_state for c in chunks]

    @torch.no_grad()
    def cut():
        return [encode_whisper_trimmed(encoder, trimmed[c], real_frames[c]).last_hidden_state for c in chunks]

    timings = time_interleaved({"padded_3000_frames": padded, "trimmed": cut}, args.repeats, warmups={
        "padded_3000_frames": torch.no_grad()(lambda: encoder(input_features=full[:1])),
        "trimmed": torch.no_grad()(lambda: encode_whisper_trimmed(encoder, trimmed[:1], real_frames[:1])),
    })
    padded_out, trimmed_out = torch.cat(padded()), torch.cat(cut())
    out_frames = encoder._get_feat_extract_output_lengths(real_frames)  # output frames covering real audio
    mask_padded = torch.arange(padded_out.shape[1]) < out_frames.unsqueeze(1)
    mask_trimmed = torch.arange(trimmed_out.shape[1]) < out_frames.unsqueeze(1)

    def pool(hidden, mask):
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    a, b = pool(padded_out, mask_padded), pool(trimmed_out, mask_trimmed)
    cosine = F.cosine_similarity(a, b, dim=-1)
    padded_s, trimmed_s = timings["padded_3000_frames"]["median_s"], timings["trimmed"]["median_s"]
    result = {
        "clips": len(clips),
        "batch_size": batch,
        "clip_seconds": [round(len(x) / extractor.sampling_rate, 3) for x in audio][:3],
        "input_frames_padded": full.shape[-1],
        "input_frames_trimmed": frames,
        "output_frames_padded": padded_out.shape[1],
        "output_frames_trimmed": trimmed_out.shape[1],
        "reimplementation_max_abs_diff_on_3000_frames": check,
        "padded_s": padded_s,
        "trimmed_s": trimmed_s,
        "padded_s_per_clip": padded_s / len(clips),
        "trimmed_s_per_clip": trimmed_s / len(clips),
        "speedup": padded_s / trimmed_s,
        "pooled_cosine_mean": float(cosine.mean()),
        "pooled_cosine_min": float(cosine.min()),
        "pooled_max_abs_diff": float((a - b).abs().max()),
        "pooled_max_abs_value": float(a.abs().max()),
        "pooled_relative_l2_diff_mean": float(((a - b).norm(dim=-1) / a.norm(dim=-1)).mean()),
        "timings": timings,
    }
    results["c_whisper_padding"] = result


# ------------------------------------------------------------------------------------------------------ tables
def render(results: dict) -> tuple[list, list[str]]:
    """The markdown tables and notes of a run's `results` (also used by `--render` on a saved JSON)."""
    tables, notes = [], []
    if "a_toolkit_vs_bare" in results:
        rows = results["a_toolkit_vs_bare"]

        def met(ratio):
            return "yes" if ratio >= 0.9 else "no"

        tables.append((
            "a) Extraction throughput: toolkit `extract_embeddings` vs bare backbone forward (goal: ratio >= 0.9)",
            ["modality", "backbone", "utterances", "batch", "toolkit utt/s", "bare backbone utt/s",
             "ratio toolkit/bare (medians)", "ratio (best runs)", "goal met (medians / best)",
             "max abs diff of embeddings"],
            [[r["modality"], r["backbone_path"], r["utterances"], r["batch_size"], r["toolkit_utt_per_s"],
              r["bare_backbone_utt_per_s"], r["ratio_toolkit_over_bare"], best_runs_ratio(r),
              f"{met(r['ratio_toolkit_over_bare'])} / {met(best_runs_ratio(r))}",
              r["embeddings_max_abs_diff_toolkit_vs_bare"]] for r in rows],
        ))
        tables.append((
            "a) Where the toolkit's time goes (medians over the whole set; shares of the toolkit's time)",
            ["modality", "toolkit s", "processor s", "backbone s", "processor share", "backbone share", "rest share",
             "feature extractor/tokenizer alone s"],
            [[r["modality"], r["toolkit_s"], r["processor_s"], r["backbone_s"], r["processor_share_of_toolkit"],
              r["backbone_share_of_toolkit"], r["rest_share_of_toolkit"], r["bare_features_s"]] for r in rows],
        ))
        notes.append("a) The bare baseline times only `backbone(**inputs)` on feature-extractor/tokenizer outputs "
                     "computed beforehand, so the ratio charges the toolkit for everything else it does: reading and "
                     "resampling the wav files (EmoDB is 22,050 Hz), feature extraction or tokenization, padding into "
                     "conversations, pooling. 'processor s' is `MisterEProcessor.__call__` on the same batches (audio "
                     "decoding and resampling included); 'feature extractor/tokenizer alone' runs them on in-memory "
                     "16-kHz audio / text; 'rest' = toolkit - processor - backbone (pooling, glue, timing noise).")
        notes.append("a) 'best runs' divides the fastest bare run by the fastest toolkit run: interference from other "
                     "processes or virtual machines only ever adds time, so the fastest of the repeats is the least "
                     "disturbed estimate (as `timeit` advises). When the two ratios disagree about the goal, the "
                     "difference is within the run-to-run noise (see `timings` in the JSON).")
    if "b_length_grouping" in results:
        r = results["b_length_grouping"]
        low, high = r["seconds_range"]
        tables.append((
            "b) Length-grouped vs naive batching (wav2vec2-base, random noise; goal: speed-up >= 1.3x)",
            ["utterances", "lengths s", "batch", "grouped s", "naive s", "speed-up", "goal met",
             "samples computed / real (grouped)", "(naive)", "max abs diff of embeddings"],
            [[r["utterances"], f"{low}-{high}", r["batch_size"], r["grouped_s"], r["naive_s"],
              r["speedup_grouped_over_naive"], "yes" if r["speedup_grouped_over_naive"] >= 1.3 else "no",
              r["padding_factor_grouped"], r["padding_factor_naive"], r["embeddings_max_abs_diff"]]],
        ))
        notes.append("b) Both variants are `mister_e_hf.cache.extract_embeddings` on the same wav files (float32, "
                     "16 kHz); the naive one patches its length key to a constant, so the stable sort keeps the random "
                     "order and nothing else changes. 'samples computed / real' is the padding overhead of each "
                     "batching. The embeddings agree up to float rounding (the layer-norm wav2vec2 variant with an "
                     "attention mask is padding-invariant).")
    if "c_whisper_padding" in results:
        r = results["c_whisper_padding"]
        check = r["reimplementation_max_abs_diff_on_3000_frames"]
        tables.append((
            "c) Whisper tiny.en encoder: 30-s padded input vs input trimmed to the audio (EmoDB 2-s clips)",
            ["clips", "mel frames", "padded s/clip", "trimmed s/clip", "speed-up", "pooled cosine (mean / min)",
             "pooled max abs diff", "reimplementation check (3000 frames)"],
            [[r["clips"], f"{r['input_frames_padded']} -> {r['input_frames_trimmed']}", r["padded_s_per_clip"],
              r["trimmed_s_per_clip"], r["speedup"], f"{r['pooled_cosine_mean']:.4f} / {r['pooled_cosine_min']:.4f}",
              r["pooled_max_abs_diff"], f"{check:.1e}"]],
        ))
        notes.append("c) The trimmed embeddings are NOT equal to the padded ones, and are not meant to be: Whisper's "
                     "encoder has no attention mask and attends over the padding (log-mel of silence up to 30 s), so "
                     "the states of the real frames depend on it. Embeddings of trimmed input are a different feature "
                     "(a model trained on padded-input embeddings should not be fed trimmed ones, and vice versa). "
                     "Pooling: mean over the output frames that cover real audio, as the toolkit pools. The trimmed "
                     "forward reimplements `WhisperEncoder.forward`; it matches transformers' to "
                     f"{check:.1e} on the full 3000-frame input.")
    return tables, notes


def main():
    args = parse_args()
    if args.render is not None:
        rerender(args.render, "Embedding extraction", render)
        return
    setup(args)
    results = {}
    for part, run in (("a", part_a), ("b", part_b), ("c", part_c)):
        if part in args.parts:
            run(args, results)
    write_results(args, "extraction", "Embedding extraction", results, *render(results))


if __name__ == "__main__":
    main_guard(main)
