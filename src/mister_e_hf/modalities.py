"""The one table of modalities: for each, the utterance key a conversation gives it under, the dataset column a
corpus loader stores it in, the model inputs it arrives as, and what its backbone reads. Everything that maps a
modality to a name (processor, model, cache, collator, fine-tuning) reads it here."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """One modality and its names.

    Attributes:
        name: `speech`, `text` or `visual` (config fields are `<name>_config`, `<name>_embed_dim`, ...; model inputs
            `<name>_embeds`, `<name>_mask`).
        key: the utterance key (`{"audio": ..., "text": ..., "image": ...}`).
        column: the per-turn dataset column of a corpus loader's rows.
        inputs: the raw model inputs, `(batch, utterances, ...)`.
        backbone_inputs: what a backbone of this modality reads (its `main_input_name`).
    """

    name: str
    key: str
    column: str
    inputs: tuple[str, ...]
    backbone_inputs: tuple[str, ...]


MODALITY_TABLE = {
    m.name: m
    for m in (
        Modality("speech", key="audio", column="audio",
                 inputs=("input_values", "input_features", "speech_attention_mask"),
                 backbone_inputs=("input_values", "input_features")),
        Modality("text", key="text", column="texts", inputs=("input_ids", "text_attention_mask"),
                 backbone_inputs=("input_ids",)),
        Modality("visual", key="image", column="images", inputs=("pixel_values",), backbone_inputs=("pixel_values",)),
    )
}

MODALITIES = tuple(MODALITY_TABLE)
"""The modalities a MiSTER-E model can hold, in the order used everywhere (inputs, experts, plots)."""


__all__ = ["Modality", "MODALITY_TABLE", "MODALITIES"]
