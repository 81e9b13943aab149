"""Live recognition: one new utterance at a time, with state, never recomputing earlier utterances.

Needs a causal model (`context_bidirectional=False`: each utterance sees only the past). Each pushed utterance goes
through the backbones once; the context layers and the cross-modal expert keep what they need of the past in the
model's `conversation_state`. The predictions equal the offline causal model's on the same conversation.
"""

import time
from dataclasses import dataclass, field

import torch

from .errors import ConversationInputError, MisterEError
from .outputs import ConversationState


@dataclass
class UtterancePrediction:
    """The prediction for one utterance: what the model's head decodes (`decoded`: for classification `label`,
    `score` and `scores`; for regression `values`, also given as `scores`), the experts' gate weights and the time it
    took."""

    turn: int
    label: str | None
    score: float | None
    scores: dict[str, float]
    gate_weights: dict
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    decoded: dict = field(default_factory=dict)


class StreamingEmotionRecognizer:
    """Recognises emotions in a live conversation, one utterance at a time.

    ```python
    recognizer = StreamingEmotionRecognizer(model, processor)
    for utterance in live_turns():          # {"audio": ..., "sampling_rate": ..., "text": ...}
        prediction = recognizer.push(utterance)
        print(prediction.label, prediction.gate_weights, prediction.latency_ms)
    recognizer.reset()                      # next conversation
    ```
    """

    def __init__(self, model, processor):
        model.check_processor(processor)
        if model.config.context_bidirectional:
            raise MisterEError(
                "Streaming needs a causal model (each utterance sees only the past): train or load one with "
                "`context_bidirectional=False`."
            )
        self.model, self.processor = model.eval(), processor
        self.state = ConversationState()

    def reset(self) -> None:
        """Forget the conversation so far."""
        self.state = ConversationState()

    @property
    def turns(self) -> int:
        return self.state.turns

    @torch.no_grad()
    def push(self, utterance: dict) -> UtterancePrediction:
        """Adds one utterance (`{"audio", "sampling_rate", "text"}`; a missing or blank value is an absent
        modality, as everywhere) and returns its prediction. A push that fails (bad input, a non-finite prediction)
        raises an error naming the turn and leaves the conversation as it was: the next push continues from the
        last good turn."""
        start = time.perf_counter()
        turn = self.turns
        try:
            inputs = self.processor(conversations=[[utterance]], return_tensors="pt")
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            prepared = time.perf_counter()
            # the model extends the state in place: give it a copy, kept only if the whole step succeeds
            outputs = self.model(**inputs, conversation_state=self.state.copy())
        except ConversationInputError as error:
            raise error.named(f"streamed turn {turn}") from None
        done = time.perf_counter()
        values = outputs.logits[0, 0].float().cpu()
        gates = outputs.gate_weights[0, 0].float().cpu()
        if not (torch.isfinite(values).all() and torch.isfinite(gates).all()):
            raise ConversationInputError("the model gave NaN or infinite scores; its weights or inputs are corrupted, "
                                         "so no prediction is made.", where=f"streamed turn {turn}")
        self.state = outputs.conversation_state
        (decoded,) = self.model.head.decode(values[None], gates[None], self.model.config.id2label,
                                            self.model.expert_names)
        return UtterancePrediction(
            turn=turn,
            label=decoded.get("label"),
            score=decoded.get("score"),
            scores=decoded.get("scores", decoded.get("values", {})),
            gate_weights=decoded["gate_weights"],
            latency_ms=1000 * (done - start),
            timings_ms={"processor": 1000 * (prepared - start), "model": 1000 * (done - prepared)},
            decoded=decoded,
        )

__all__ = ["StreamingEmotionRecognizer", "UtterancePrediction"]
