"""The built-in fusions, registered by name in `registry.FUSIONS` (`MisterEConfig.fusion`).

A fusion turns the modalities' context representations into expert predictions and gate weights; the contract is
`components.Fusion`. Register your own with `mister_e_hf.register_fusion("name")`; the model class does not change.
"""

from .fusion_film_moe import FiLMMoEFusion
from .fusion_guided_gated import GuidedGatedFusion
from .fusion_mister_e import MisterEFusion
from .registry import FUSIONS


__all__ = ["FUSIONS", "MisterEFusion", "GuidedGatedFusion", "FiLMMoEFusion"]
