"""Corpus loaders (one row per conversation, turns in order), registered by name, and the conversation collator."""

from .collator import DataCollatorForConversations
from .common import UNLABELLED, CorpusError, DataReport, build_split
from .emodb import load_emodb
from .iemocap import load_iemocap
from .manifest import load_manifest
from .meld import load_meld
from .mosi import load_mosi


LOADERS = {
    "meld": load_meld,
    "iemocap": load_iemocap,
    "mosi": load_mosi,
    "emodb": load_emodb,
    "manifest": load_manifest,
}
"""Registry of corpus loaders by the name `run_erc.py --dataset` takes."""


def load_corpus(name: str, **kwargs):
    """`(DatasetDict, DataReport)` of corpus `name`; kwargs go to its loader (`data_dir`, `fold`, `skip_invalid`, ...)."""
    if name not in LOADERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(LOADERS)}.")
    return LOADERS[name](**kwargs)


__all__ = ["LOADERS", "load_corpus", "DataCollatorForConversations", "CorpusError", "DataReport", "UNLABELLED",
           "build_split"]
