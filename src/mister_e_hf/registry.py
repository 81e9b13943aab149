"""One registry mechanism for every kind of pluggable component, so researchers extend the toolkit without editing it.

```python
import mister_e_hf
from torch import nn

@mister_e_hf.register_fusion("my-fusion")
class MyFusion(nn.Module):
    ...

mister_e_hf.list_components()      # {"fusion": ["film-moe", "guided-gated", "mister-e", "my-fusion"], ...}
MisterEConfig(..., fusion="my-fusion")
```

Each kind has one `Registry`; built-in components register themselves through the same decorators. A name can be
registered once (`override=True` replaces it on purpose), and an unknown name is an error listing the registered
ones. What a component of each kind must provide is in `docs/architecture.md` ("Adding a component"); the base
classes in `components.py` document it and give the defaults.

A checkpoint whose config names an external component needs that component's module imported before loading (the
registry is filled by importing it); `trust_remote_code` carries this package's own files only.
"""

from collections.abc import Callable, Iterator, Mapping

from .errors import MisterEError


class UnknownComponentError(MisterEError, KeyError):
    """A component name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class Registry(Mapping):
    """Components of one kind by name: `registry[name]` (an unknown name raises `UnknownComponentError` listing the
    registered ones), `name in registry`, `list(registry)`, and `registry.register(name)` as a class or function
    decorator. Extra keyword arguments of `register` are kept as the component's information (`info(name)`)."""

    def __init__(self, kind: str, description: str):
        self.kind, self.description = kind, description
        self._components: dict[str, object] = {}
        self._info: dict[str, dict] = {}

    def register(self, name: str, component=None, *, override: bool = False, **info) -> Callable:
        """Registers `component` under `name`, or returns a decorator that does. A name already taken is an error
        unless `override=True`."""
        if not isinstance(name, str) or not name.strip():
            raise MisterEError(f"A {self.kind} needs a non-empty name, got {name!r}.")

        def decorate(target):
            if name in self._components and not override and self._components[name] is not target:
                raise MisterEError(f"A {self.kind} named {name!r} is already registered "
                                   f"({_qualified(self._components[name])}); pass override=True to replace it.")
            self._components[name] = target
            self._info[name] = dict(info)
            return target

        return decorate if component is None else decorate(component)

    def unregister(self, name: str) -> None:
        """Removes `name` (e.g. a component registered by a test)."""
        self[name]  # noqa: B018 - the same error as a lookup for an unknown name
        del self._components[name], self._info[name]

    def info(self, name: str) -> dict:
        """What `register` was given besides the component (e.g. a corpus loader's `description`)."""
        self[name]  # noqa: B018
        return dict(self._info[name])

    def __getitem__(self, name: str):
        try:
            return self._components[name]
        except (KeyError, TypeError):
            raise UnknownComponentError(f"Unknown {self.kind} {name!r}; registered: {sorted(self._components)}. "
                                        f"{self.description}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._components))

    def __len__(self) -> int:
        return len(self._components)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {sorted(self._components)})"


def _qualified(component) -> str:
    return f"{getattr(component, '__module__', '?')}.{getattr(component, '__qualname__', repr(component))}"


FUSIONS = Registry("fusion", "A fusion turns the modalities' context representations into expert outputs and gate "
                             "weights (`MisterEConfig.fusion`).")
HEADS = Registry("head", "A head mixes the experts' outputs, owns the losses, decoding and metrics "
                         "(`MisterEConfig.head`).")
GATES = Registry("gate", "A gate weighs the experts per utterance (`MisterEConfig.gate_type`).")
CONTEXT_LAYERS = Registry("context layer", "A context layer runs over a conversation's utterances "
                                           "(`MisterEConfig.context_layer`).")
POOLINGS = Registry("pooling", "A pooling turns a backbone's frames or tokens into one vector "
                               "(`MisterEConfig.speech_pooling` / `text_pooling` / `visual_pooling`).")
LAYER_COMBINERS = Registry("layer combiner", "A layer combiner merges a backbone's pooled hidden layers "
                                             "(`MisterEConfig.speech_layers` / `text_layers` / `visual_layers`).")
LOADERS = Registry("corpus loader", "A corpus loader reads a corpus into conversation rows "
                                    "(`load_corpus(name)`, `run_erc.py --dataset`).")

REGISTRIES = {"fusion": FUSIONS, "head": HEADS, "gate": GATES, "context_layer": CONTEXT_LAYERS, "pooling": POOLINGS,
              "layer_combiner": LAYER_COMBINERS, "loader": LOADERS}
"""Every registry by kind."""

register_fusion = FUSIONS.register
register_head = HEADS.register
register_gate = GATES.register
register_context_layer = CONTEXT_LAYERS.register
register_pooling = POOLINGS.register
register_layer_combiner = LAYER_COMBINERS.register
register_loader = LOADERS.register


def load_builtins() -> None:
    """Imports the modules whose built-in components register themselves (idempotent): the model's components, and
    the corpus loaders where the `data` package is there (a checkpoint's copied code, loaded with
    `trust_remote_code`, holds the model's files only)."""
    # one `from .module import` line each: transformers' remote-code loader copies the files it sees imported so
    from .context_layers import ConversationContext  # noqa: F401
    from .fusion_film_moe import FiLMMoEFusion  # noqa: F401
    from .fusion_guided_gated import GuidedGatedFusion  # noqa: F401
    from .fusion_mister_e import MisterEFusion  # noqa: F401
    from .gates import ExpertGate  # noqa: F401
    from .heads import ClassificationHead  # noqa: F401
    from .layer_combiners import LayerWeighting  # noqa: F401
    from .pooling import mean_pool  # noqa: F401

    try:
        from . import data  # noqa: F401
    except ImportError:
        pass


def list_components() -> dict[str, list[str]]:
    """`{kind: [names]}` of every registered component, built-in and external."""
    load_builtins()
    return {kind: list(registry) for kind, registry in REGISTRIES.items()}


__all__ = ["Registry", "UnknownComponentError", "REGISTRIES", "FUSIONS", "HEADS", "GATES", "CONTEXT_LAYERS",
           "POOLINGS", "LAYER_COMBINERS", "LOADERS", "register_fusion", "register_head", "register_gate",
           "register_context_layer", "register_pooling", "register_layer_combiner", "register_loader",
           "list_components", "load_builtins"]
