"""Registry of fusions: how the modalities' context representations become expert predictions and gate weights.

A fusion is an `nn.Module` built as `Fusion(config, num_outputs, context_dims)` (`context_dims` maps each modality
the model holds to the size of its context representation), with a static `expert_names(config)` and a
`forward(features: dict[str, ModalityFeatures], utterance_mask, state=None) -> FusionOutput` (`state`: a dict kept
across the utterances of a streamed conversation, for fusions that look across utterances). New fusions are added
here by name; the model class does not change.
"""

from .fusion_film_moe import FiLMMoEFusion
from .fusion_guided_gated import GuidedGatedFusion
from .fusion_mister_e import MisterEFusion


FUSIONS = {"mister-e": MisterEFusion, "guided-gated": GuidedGatedFusion, "film-moe": FiLMMoEFusion}
"""Registry of fusions by the name used in `MisterEConfig.fusion`."""

__all__ = ["FUSIONS"]
