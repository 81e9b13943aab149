"""Corpus loaders (one row per conversation, turns in order), registered by name (`register_loader`), and the
conversation collator. A loader is a function taking its options as keyword arguments (its signature declares them:
`loader_options(name)`) and returning `(DatasetDict, DataReport)`; `register_loader(name, description=...)` gives the
one-line description model cards show."""

import inspect

from .collator import DataCollatorForConversations
from .common import UNLABELLED, CorpusError, DataReport, build_split
from .emodb import load_emodb
from .iemocap import load_iemocap
from .manifest import load_manifest
from .meld import load_meld
from .mosi import load_mosi
from ..registry import LOADERS, register_loader


def _loader(name: str):
    if name not in LOADERS:
        raise CorpusError(f"Unknown dataset {name!r}; choose one of {list(LOADERS)}.")
    return LOADERS[name]


def loader_options(name: str) -> list[str]:
    """The options (keyword arguments) corpus `name`'s loader takes, in its signature's order."""
    return list(inspect.signature(_loader(name)).parameters)


OPTION_ALIASES = {"label_set": ("label_set", "label_column")}
"""Generic option names (what `run_erc.py` and the CLI call them) -> the loader options they may mean: MELD names its
label set by column (`label_column`: emotion | sentiment), the others `label_set`."""


def loader_arguments(name: str, flags: dict[str, str] | None = None, **given) -> dict:
    """The loader options of corpus `name` for the generic arguments `given` (`None` values are left out, so the
    loader's own defaults hold), each mapped to the option of that name or an alias (`OPTION_ALIASES`). An argument
    the corpus takes no option for is a `CorpusError` naming it (as `flags[argument]` says it, e.g. `--fold`) and
    the options the corpus takes: never silently ignored."""
    accepted = loader_options(name)
    options = {}
    for argument, value in given.items():
        if value is None:
            continue
        option = next((o for o in OPTION_ALIASES.get(argument, (argument,)) if o in accepted), None)
        if option is None:
            shown = (flags or {}).get(argument, argument)
            raise CorpusError(f"{shown} does not apply to the {name} corpus (its loader takes: {', '.join(accepted)}).")
        options[option] = value
    return options


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


__all__ = ["LOADERS", "register_loader", "load_corpus", "loader_options", "loader_arguments", "DataCollatorForConversations",
           "CorpusError", "DataReport", "UNLABELLED", "build_split"]
