"""Fixtures: a tiny tokenizer and a builder of tiny MiSTER-E models with random backbones."""

import pytest
import torch
from helpers import (
    SPECIAL_TOKENS,
    TINY_HEAD,
    WORDS,
    common_args,
    feature_extractor,
    run_erc,
    speech_config,
    text_config,
    write_corpus,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertModel, PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from mister_e_hf import MisterEConfig, MisterEModel, MisterEProcessor


@pytest.fixture(scope="session")
def tokenizer():
    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]",
    )


@pytest.fixture
def build(tokenizer):
    """`build(speech=..., text=..., **config)` -> (model in eval mode, processor) with tiny random backbones."""

    def _build(speech: str | None = "wav2vec2", text: str | None = "bert", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = MisterEConfig(
            speech_config=speech_config(speech) if speech else None,
            text_config=text_config(text, len(tokenizer)) if text else None,
            **{**TINY_HEAD, **overrides},
        )
        processor = MisterEProcessor(
            feature_extractor=feature_extractor(speech) if speech else None, tokenizer=tokenizer if text else None
        )
        return MisterEModel(config).eval(), processor

    return _build


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory, tokenizer):
    """Two tiny random backbones saved like Hub checkpoints (weights + feature extractor / tokenizer)."""
    folder = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    Wav2Vec2Model(speech_config("wav2vec2")).save_pretrained(folder / "speech")
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, return_attention_mask=True).save_pretrained(
        folder / "speech")
    BertModel(text_config("bert", len(tokenizer))).save_pretrained(folder / "text")
    tokenizer.save_pretrained(folder / "text")
    return folder / "speech", folder / "text"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_backbones, corpus):
    """(output folder, embedding cache folder) of one `examples/run_erc.py` run on the tiny corpus, frozen backbones."""
    folder = tmp_path_factory.mktemp("trained")
    result = run_erc(*common_args(tiny_backbones, corpus, folder / "run", folder / "cache"), "--num_train_epochs", "3",
                     "--learning_rate", "3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", folder / "cache"
