"""mister_e_hf: multimodal (speech + text) Emotion Recognition in Conversations with Hugging Face transformers.

Importing the package registers MiSTER-E with `AutoConfig`, `AutoModel` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_mister_e import MisterEConfig
from .modeling_mister_e import MisterEModel, MisterEPreTrainedModel
from .outputs import MisterEOutput
from .processing_mister_e import ConversationInputError, MisterEProcessor


AutoConfig.register(MisterEConfig.model_type, MisterEConfig, exist_ok=True)
AutoModel.register(MisterEConfig, MisterEModel, exist_ok=True)
AutoProcessor.register(MisterEConfig, MisterEProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "MisterEConfig",
    "MisterEModel",
    "MisterEPreTrainedModel",
    "MisterEOutput",
    "MisterEProcessor",
    "ConversationInputError",
]
