"""mister_e_hf: multimodal (speech + text) Emotion Recognition in Conversations with Hugging Face transformers.

Importing the package registers MiSTER-E with `AutoConfig`, `AutoModel` and `AutoProcessor`, the pipeline task
`"conversational-emotion-recognition"`, and its built-in components (`list_components()`); `register_fusion`,
`register_head`, ... add your own.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_mister_e import FROZEN_BACKBONE_DEFAULTS, MisterEConfig
from .errors import CacheError, ConversationInputError, CorpusError, MisterEError, TrainingError
from .modeling_mister_e import MisterEModel, MisterEPreTrainedModel
from .outputs import MisterEOutput
from .pipeline import TASK, ConversationalEmotionRecognitionPipeline
from .processing_mister_e import MisterEProcessor
from .registry import (
    list_components,
    register_context_layer,
    register_fusion,
    register_gate,
    register_head,
    register_layer_combiner,
    register_loader,
    register_pooling,
)
from .streaming import StreamingEmotionRecognizer


AutoConfig.register(MisterEConfig.model_type, MisterEConfig, exist_ok=True)
AutoModel.register(MisterEConfig, MisterEModel, exist_ok=True)
AutoProcessor.register(MisterEConfig, MisterEProcessor, exist_ok=True)
if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ConversationalEmotionRecognitionPipeline, pt_model=AutoModel, type="multimodal"
    )

__version__ = "0.1.0"

__all__ = [
    "MisterEConfig",
    "FROZEN_BACKBONE_DEFAULTS",
    "MisterEModel",
    "MisterEPreTrainedModel",
    "MisterEOutput",
    "MisterEProcessor",
    "ConversationInputError",
    "MisterEError",
    "CorpusError",
    "CacheError",
    "TrainingError",
    "ConversationalEmotionRecognitionPipeline",
    "StreamingEmotionRecognizer",
    "list_components",
    "register_fusion",
    "register_head",
    "register_gate",
    "register_context_layer",
    "register_pooling",
    "register_layer_combiner",
    "register_loader",
]
