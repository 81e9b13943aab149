"""Fixtures: a tiny tokenizer and a builder of tiny MiSTER-E models with random backbones."""

import pytest
import torch
from helpers import SPECIAL_TOKENS, TINY_HEAD, WORDS, feature_extractor, speech_config, text_config
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


