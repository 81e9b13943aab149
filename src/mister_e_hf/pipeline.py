"""`pipeline("conversational-emotion-recognition", model=...)`: conversations in, per-utterance emotions out.

```python
import mister_e_hf
from transformers import pipeline

recognizer = pipeline("conversational-emotion-recognition", model="my-model")
recognizer([{"audio": "turn1.wav", "text": "Hi!"}, {"audio": "turn2.wav", "text": "Leave me alone."}])
# [{"label": "neutral", "score": 0.71, "scores": {...}, "gate_weights": {"speech": 0.2, ...}}, ...]
```

Input: one conversation (a list of `{"audio": path | array, "sampling_rate": ..., "text": ...}`) or a list of them.
Utterances without text can be transcribed first by any transformers speech-recognition model (`asr_model=`).
"""

import os

import torch
from transformers import Pipeline

from .errors import ConversationInputError, MisterEError
from .processing_mister_e import check_backbone_path, is_blank, read_audio, resample


class ConversationalEmotionRecognitionPipeline(Pipeline):
    """Emotion of every utterance of one or many conversations, with the experts' gate weights.

    Call parameters: `batch_size` (conversations per model call, a positive integer; results do not depend on it),
    `asr_model` (a speech-recognition model id, folder or pipeline, used for utterances that have audio but no text,
    i.e. a missing or blank `text`). Any other parameter is an error. Errors name the conversation (its position in
    the input) and utterance.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise MisterEError("The conversational-emotion-recognition pipeline needs the model's MisterEProcessor "
                               "(saved beside it, or `processor=`).")
        self.model.check_processor(self.processor)
        self._asr = {}

    def _sanitize_parameters(self, asr_model=None, **kwargs):
        if kwargs:
            raise MisterEError(f"Unknown parameters {sorted(kwargs)} for the conversational-emotion-recognition "
                               "pipeline; it takes `batch_size` and `asr_model`.")
        preprocess = {"asr_model": asr_model} if asr_model is not None else {}
        return preprocess, {}, {}

    @staticmethod
    def _conversations(conversations) -> tuple[list, bool]:
        """(list of conversations, whether one conversation was given) from the pipeline's input."""
        if isinstance(conversations, (list, tuple)) and conversations and all(isinstance(c, dict) for c in conversations):
            return [list(conversations)], True
        if isinstance(conversations, (list, tuple)) and conversations:
            return list(conversations), False
        given = "an empty list" if isinstance(conversations, (list, tuple)) else type(conversations).__name__
        hint = " (one utterance? wrap it: [utterance])" if isinstance(conversations, dict) else ""
        raise MisterEError(f"The pipeline takes one conversation (a list of utterance dicts such as "
                           f"{{'text': ..., 'audio': ...}}) or a list of conversations; got {given}{hint}.")

    def __call__(self, conversations, batch_size: int | None = None, **kwargs):
        batch, single = self._conversations(conversations)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        size = batch_size if batch_size is not None else (self._batch_size or 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MisterEError(f"`batch_size` must be a positive number of conversations, got {size!r}.")
        results = []
        for start in range(0, len(batch), size):
            try:
                inputs = self.preprocess(batch[start : start + size], **preprocess_params)
                results.extend(self.postprocess(self.forward(inputs, **forward_params), **postprocess_params))
            except ConversationInputError as error:  # positions in the chunk -> positions in the input
                if error.conversation is None or error.where is not None:
                    raise
                raise ConversationInputError(error.detail, start + error.conversation, error.utterance) from None
        return results[0] if single else results

    # -------------------------------------------------------------------------------------------- stages
    def _transcriber(self, asr_model):
        """A speech-recognition pipeline from a model id or folder (loaded once), or the one given. Clips longer than
        the ASR model's window are transcribed in 30-s chunks."""
        from transformers import AutomaticSpeechRecognitionPipeline, pipeline

        if isinstance(asr_model, AutomaticSpeechRecognitionPipeline):
            return asr_model
        if not isinstance(asr_model, (str, os.PathLike)):
            raise MisterEError(f"`asr_model` must be a speech-recognition model id or folder, or an "
                               f"automatic-speech-recognition pipeline; got {type(asr_model).__name__}.")
        key = str(asr_model)
        if key not in self._asr:
            check_backbone_path(key, "speech-recognition")
            self._asr[key] = pipeline("automatic-speech-recognition", model=key, device=self.device)
        return self._asr[key]

    def _fill_transcripts(self, conversations, asr_model):
        """Copies of the conversations where each utterance with audio but no text gets the ASR transcript (other
        values are left for the processor to check and name)."""
        if asr_model is None:
            return conversations
        filled = []
        for b, conversation in enumerate(conversations):
            if not isinstance(conversation, (list, tuple)):
                filled.append(conversation)
                continue
            utterances = []
            for u, utterance in enumerate(conversation):
                if not isinstance(utterance, dict):
                    utterances.append(utterance)
                    continue
                utterance = dict(utterance)
                if is_blank(utterance.get("text")) and not is_blank(utterance.get("audio")) and asr_model is not None:
                    samples, rate = read_audio(utterance["audio"], utterance.get("sampling_rate"), b, u)
                    transcriber = self._transcriber(asr_model)
                    target = transcriber.feature_extractor.sampling_rate  # resampled here: no torchaudio needed
                    samples = resample(samples, rate, target)
                    utterance["text"] = transcriber({"raw": samples, "sampling_rate": target},
                                                    chunk_length_s=30)["text"].strip()
                    utterance["transcribed"] = True
                utterances.append(utterance)
            filled.append(utterances)
        return filled

    def preprocess(self, conversations, asr_model=None):
        conversations = self._fill_transcripts(conversations, asr_model)
        inputs = dict(self.processor(conversations=conversations, return_tensors="pt"))
        inputs["_texts"] = [[u.get("text") if isinstance(u, dict) and u.get("transcribed") else None for u in c]
                            for c in conversations]
        return inputs

    def _forward(self, inputs):
        texts = inputs.pop("_texts")
        outputs = self.model(**inputs)
        return {"logits": outputs.logits, "gate_weights": outputs.gate_weights,
                "utterance_mask": outputs.utterance_mask, "texts": texts}

    def postprocess(self, outputs):
        """Per utterance, what the model's head decodes (classification: `label`, `score`, `scores`; regression:
        `values` per dimension; a plug-in head its own) and the experts' `gate_weights`, plus the `transcript` of
        utterances transcribed here. A non-finite score is an error, never a prediction."""
        logits = outputs["logits"].float().cpu()
        gates = outputs["gate_weights"].float().cpu()
        mask = outputs["utterance_mask"].cpu()
        bad = mask & ~(torch.isfinite(logits).all(-1) & torch.isfinite(gates).flatten(2).all(-1))
        if bad.any():
            b, u = bad.nonzero()[0].tolist()
            raise ConversationInputError("the model gave NaN or infinite scores; its weights or inputs are corrupted, "
                                         "so no prediction is made.", b, u)
        results = []
        for b, length in enumerate(mask.sum(1).tolist()):
            conversation = self.model.head.decode(logits[b, :length], gates[b, :length], self.model.config.id2label,
                                                  self.model.expert_names)
            for t, item in enumerate(conversation):
                if outputs["texts"][b][t] is not None:
                    item["transcript"] = outputs["texts"][b][t]
            results.append(conversation)
        return results


TASK = "conversational-emotion-recognition"

__all__ = ["ConversationalEmotionRecognitionPipeline", "TASK"]
