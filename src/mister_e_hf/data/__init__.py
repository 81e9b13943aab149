"""Corpus loaders (one row per conversation, turns in order), registered by name, and the conversation collator."""

import inspect

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


def _loader(name: str):
    if name not in LOADERS:
        raise CorpusError(f"Unknown dataset {name!r}; choose one of {sorted(LOADERS)}.")
    return LOADERS[name]


def loader_options(name: str) -> list[str]:
    """The options (keyword arguments) corpus `name`'s loader takes, in its signature's order."""
    return list(inspect.signature(_loader(name)).parameters)


def load_corpus(name: str, **options):
    """`(DatasetDict, DataReport)` of corpus `name`; `options` go to its loader (`data_dir`, `fold`, `skip_invalid`,
    ...: see `loader_options(name)`). An option the loader does not take, or a required one missing (or None), is a
    `CorpusError` naming it and listing the options that corpus takes."""
    loader = _loader(name)
    parameters = inspect.signature(loader).parameters
    accepted = list(parameters)
    unknown = [option for option in options if option not in parameters]
    if unknown:
        raise CorpusError(f"{name} does not take option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; it takes: {', '.join(accepted)}")
    missing = [p.name for p in parameters.values()
               if p.default is inspect.Parameter.empty and options.get(p.name) is None]
    if missing:
        raise CorpusError(f"{name} needs option{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                          f"it takes: {', '.join(accepted)}")
    return loader(**options)


__all__ = ["LOADERS", "load_corpus", "loader_options", "DataCollatorForConversations", "CorpusError", "DataReport",
           "UNLABELLED", "build_split"]
