"""Live recognition: one new utterance at a time, with state, never recomputing earlier utterances.

Needs a causal model (`context_bidirectional=False`: each utterance sees only the past). Each pushed utterance goes
through the backbones once; the context layers and the cross-modal expert keep what they need of the past in the
model's `conversation_state`. The predictions equal the offline causal model's on the same conversation.
"""

import time
from dataclasses import dataclass, field

import torch


@dataclass
class UtterancePrediction:
    """The prediction for one utterance: label, class scores (for a regression head: no label, and `scores` holds the
    value of each dimension), the experts' gate weights and the time it took."""

    turn: int
    label: str | None
    score: float | None
    scores: dict[str, float]
    gate_weights: dict
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"turn": self.turn, "label": self.label, "score": self.score, "scores": self.scores,
                "gate_weights": self.gate_weights, "latency_ms": self.latency_ms}


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
        if model.config.context_bidirectional:
            raise ValueError(
                "Streaming needs a causal model (each utterance sees only the past): train or load one with "
                "`context_bidirectional=False`."
            )
        self.model, self.processor = model.eval(), processor
        self.state: dict = {}

    def reset(self) -> None:
        """Forget the conversation so far."""
        self.state = {}

    @property
    def turns(self) -> int:
        return self.state.get("turns", 0)

    @torch.no_grad()
    def push(self, utterance: dict) -> UtterancePrediction:
        """Adds one utterance (`{"audio", "sampling_rate", "text"}`) and returns its prediction."""
        start = time.perf_counter()
        inputs = self.processor(conversations=[[utterance]], return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        prepared = time.perf_counter()
        outputs = self.model(**inputs, conversation_state=self.state)
        self.state = outputs.conversation_state
        done = time.perf_counter()
        id2label = self.model.config.id2label
        regression = self.model.config.head == "regression"
        values = outputs.logits[0, 0].float().cpu()
        values = values if regression else values.exp()  # values, or class probabilities
        best = None if regression else int(values.argmax())
        return UtterancePrediction(
            turn=self.turns - 1,
            label=None if regression else id2label[best],
            score=None if regression else float(values[best]),
            scores={id2label[i]: float(v) for i, v in enumerate(values)},
            gate_weights=dict(zip(self.model.expert_names, outputs.gate_weights[0, 0].float().cpu().tolist())),
            latency_ms=1000 * (done - start),
            timings_ms={"processor": 1000 * (prepared - start), "model": 1000 * (done - prepared)},
        )


__all__ = ["StreamingEmotionRecognizer", "UtterancePrediction"]
