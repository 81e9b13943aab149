#!/usr/bin/env python
"""A fusion and a head written outside the package, registered, trained, saved, reloaded and used: how a researcher
extends mister_e_hf without editing it.

    python examples/custom_fusion.py --data_dir my_manifest_folder \
        --speech_model_name_or_path ../shared/models/whisper-tiny.en \
        --text_model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --output_dir runs/custom

- `late-average` (a `Fusion`): one expert per modality on its context representation, and a cross-modal expert on
  both; the gate is whatever `gate_type` names. It returns an extra loss, `agreement_loss` (how far apart the experts'
  distributions are), declared with its default weight in `loss_terms`; `--config_overrides`-style
  `loss_weights={"agreement_loss": ...}` changes it like any built-in term.
- `margin-classification` (a `Head`, from the built-in classification head): adds a `margin_loss` (a hinge on the
  mixture's top-1 / top-2 margin) and decodes each utterance's `margin` beside its label and scores.

Both register themselves when this file is imported; a checkpoint naming them loads with `AutoModel.from_pretrained`
wherever this module is imported first (`trust_remote_code` carries only the package's own files, not plug-ins).
"""

import argparse
import json
import sys

import torch
from torch import nn
from transformers import AutoModel, TrainingArguments, pipeline

from mister_e_hf import MisterEModel, MisterEProcessor, list_components, register_fusion, register_head
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.components import Fusion
from mister_e_hf.data import DataCollatorForConversations, load_corpus
from mister_e_hf.evaluation import evaluate_split
from mister_e_hf.heads import ClassificationHead
from mister_e_hf.outputs import FusionOutput
from mister_e_hf.pipeline import TASK
from mister_e_hf.registry import GATES
from mister_e_hf.trainer import MisterETrainer, build_compute_metrics


@register_fusion("late-average")
class LateAverageFusion(Fusion):
    """One linear expert per modality, one on both modalities' context concatenated, weighed by the configured gate;
    `agreement_loss`: the mean squared distance between every available expert's distribution and their average."""

    def __init__(self, config, num_outputs: int, context_dims: dict[str, int]):
        super().__init__()
        self.modalities = tuple(context_dims)
        self.experts = nn.ModuleDict({m: nn.Linear(d, num_outputs) for m, d in context_dims.items()})
        self.joint = nn.Linear(sum(context_dims.values()), num_outputs) if len(context_dims) > 1 else None
        self.gate = GATES[config.gate_type](config, len(self.expert_names(config)), num_outputs)

    @staticmethod
    def expert_names(config) -> list[str]:
        return list(config.modalities) + (["joint"] if len(config.modalities) > 1 else [])

    @classmethod
    def loss_terms(cls, config) -> dict[str, float]:
        return {"agreement_loss": 0.2}

    def forward(self, features, utterance_mask, state=None) -> FusionOutput:
        outputs = [self.experts[m](features[m].context) for m in self.modalities]
        masks = [features[m].mask for m in self.modalities]
        if self.joint is not None:
            outputs.append(self.joint(torch.cat([features[m].context for m in self.modalities], dim=-1)))
            masks.append(torch.stack(masks).all(0))
        expert_outputs = torch.stack(outputs, dim=2)  # (B, U, E, C)
        expert_mask = torch.stack(masks, dim=2) & utterance_mask.unsqueeze(-1)
        probabilities = expert_outputs.softmax(-1) * expert_mask.unsqueeze(-1)
        mean = probabilities.sum(2, keepdim=True) / expert_mask.sum(2, keepdim=True).clamp_min(1).unsqueeze(-1)
        spread = ((probabilities - mean) ** 2).sum(-1)[expert_mask]
        return FusionOutput(expert_outputs=expert_outputs, expert_mask=expert_mask,
                            gate_weights=self.gate(expert_outputs, expert_mask),
                            aux_losses={"agreement_loss": spread.mean() if spread.numel() else spread.sum()})


@register_head("margin-classification")
class MarginClassificationHead(ClassificationHead):
    """The classification head, plus `margin_loss` (a hinge that asks the mixture's true class to beat the runner-up
    by `MARGIN` in log-probability) and each utterance's decoded `margin` (top-1 minus top-2 probability)."""

    MARGIN = 0.5

    @classmethod
    def loss_terms(cls, config) -> dict[str, float]:
        return {**super().loss_terms(config), "margin_loss": 0.1}

    def losses(self, logits, fusion, labels, utterance_mask):
        losses = super().losses(logits, fusion, labels, utterance_mask)
        labelled = self.check_labels(labels, utterance_mask)
        true = logits[labelled].gather(-1, labels[labelled].unsqueeze(-1)).squeeze(-1)
        rival = logits[labelled].scatter(-1, labels[labelled].unsqueeze(-1), float("-inf")).amax(-1)
        losses["margin_loss"] = torch.relu(self.MARGIN - (true - rival)).mean() if len(true) else logits.sum() * 0
        return losses

    @classmethod
    def decode(cls, logits, gate_weights, id2label, expert_names):
        decoded = super().decode(logits, gate_weights, id2label, expert_names)
        for item in decoded:
            top = sorted(item["scores"].values(), reverse=True)
            item["margin"] = top[0] - (top[1] if len(top) > 1 else 0.0)
        return decoded


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="a manifest folder (train/validation/test .csv or .jsonl)")
    parser.add_argument("--speech_model_name_or_path")
    parser.add_argument("--text_model_name_or_path")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--embedding_cache_dir")
    parser.add_argument("--projection_dim", type=int, default=64)
    args = parser.parse_args(argv)

    print("registered components:", json.dumps(list_components()))
    datasets, _ = load_corpus("manifest", data_dir=args.data_dir)
    labels = datasets["train"].features["labels"].feature.names
    backbones = (args.speech_model_name_or_path, args.text_model_name_or_path)
    model = MisterEModel.from_backbones(*backbones, freeze_speech_backbone=True, freeze_text_backbone=True,
                                        id2label=dict(enumerate(labels)), fusion="late-average",
                                        head="margin-classification", projection_dim=args.projection_dim,
                                        cross_attention_heads=2, context_hidden_size=16)
    processor = MisterEProcessor.from_backbones(*backbones)
    datasets, _ = add_cached_embeddings(model, processor, datasets, args.embedding_cache_dir)

    training = TrainingArguments(output_dir=f"{args.output_dir}/checkpoints", num_train_epochs=args.epochs,
                                 learning_rate=3e-3, per_device_train_batch_size=4, eval_strategy="no",
                                 save_strategy="no", report_to="none", remove_unused_columns=False, seed=0,
                                 logging_strategy="epoch", disable_tqdm=True)
    trainer = MisterETrainer(model=model, args=training, train_dataset=datasets["train"],
                             data_collator=DataCollatorForConversations(processor), processing_class=processor,
                             compute_metrics=build_compute_metrics(labels, model.expert_names, head=model.head))
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.endswith("_loss")}
    print("loss terms logged:", json.dumps(logged))
    metrics = evaluate_split(trainer, datasets["test"], "test") if "test" in datasets else {}
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)

    loaded = AutoModel.from_pretrained(args.output_dir)  # works because this module registered the plug-ins
    recognizer = pipeline(TASK, model=loaded, processor=MisterEProcessor.from_pretrained(args.output_dir))
    conversation = [{"text": text} for text in datasets["test"][0]["texts"]] if "test" in datasets else [
        {"text": "hello"}]
    if args.speech_model_name_or_path:
        conversation = [{**utterance, "audio": audio} for utterance, audio in
                        zip(conversation, datasets["test"][0]["audio"])]
    predictions = recognizer(conversation)
    print("prediction:", json.dumps(predictions[0]))
    return {"logged": logged, "metrics": metrics, "predictions": predictions,
            "components": list_components(), "fusion": type(loaded.fusion).__name__, "head": type(loaded.head).__name__}


if __name__ == "__main__":
    main(sys.argv[1:])
