"""Optional utterance-level fine-tuning of a backbone (full or LoRA) before its embeddings are cached.

The backbone, its pooling and a linear classifier learn the utterance labels of the training split (each utterance
on its own, no context). LoRA adapters are merged back into the backbone's weights afterwards, so the MiSTER-E model
keeps a plain transformers backbone that saves and loads like any other; the backbone is then frozen again. The
embedding cache keys on the backbone's weights, so fine-tuned embeddings never mix with earlier ones.
"""

import math

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from .data.common import UNLABELLED
from .errors import ConversationInputError, MisterEError, TrainingError
from .modalities import MODALITY_TABLE
from .processing_mister_e import is_blank
from .trainer import FiniteTrainingMixin, _non_finite


METHODS = ("full", "lora")


class _FinetuningTrainer(FiniteTrainingMixin, Trainer):
    """`Trainer`, stopped with a `TrainingError` at the first non-finite loss or gradient, as `MisterETrainer` is."""


def finetuning_problems(method: str = "lora", epochs: float = 2.0, learning_rate: float = 2e-5, lora_r: int = 8,
                        lora_alpha: float = 16, head: str = "classification") -> list[str]:
    """What makes fine-tuning settings unusable, one phrase per problem: a method other than `full` / `lora`, epochs
    that are not positive and finite, a learning rate outside (0, 1] (AdamW's steps are the learning rate in weight
    units; above 1 they destroy a pretrained backbone), a LoRA rank below 1 or a scaling that is not positive, and a
    regression head (the fine-tuning objective is the utterances' class labels)."""
    problems = []
    if method not in METHODS:
        problems.append(f"the method is 'full' or 'lora', got {method!r}")
    if head != "classification":
        problems.append(f"utterance-level fine-tuning learns class labels; a {head} head has none (train with "
                        "frozen backbones, --freeze_backbones, or with the backbones unfrozen in MiSTER-E training)")
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        problems.append(f"epochs is {epochs} (it must be > 0 and finite: 0 epochs fine-tune nothing)")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and 0 < learning_rate <= 1):
        problems.append(f"the learning rate is {learning_rate} (it must be in (0, 1])")
    if method == "lora":
        if not (isinstance(lora_r, int) and lora_r >= 1):
            problems.append(f"the LoRA rank is {lora_r} (it must be an integer >= 1)")
        if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
            problems.append(f"the LoRA scaling (alpha) is {lora_alpha} (it must be > 0 and finite)")
    return problems


def check_finetuning_settings(method: str = "lora", epochs: float = 2.0, learning_rate: float = 2e-5,
                              lora_r: int = 8, lora_alpha: float = 16, head: str = "classification") -> None:
    """Refuses (`MisterEError`, every problem in one message) fine-tuning settings that cannot work
    (`finetuning_problems`)."""
    problems = finetuning_problems(method, epochs, learning_rate, lora_r, lora_alpha, head)
    if problems:
        raise MisterEError("Backbone fine-tuning settings that cannot work: " + "; ".join(problems) + ".")


class UtteranceClassifier(nn.Module):
    """A MiSTER-E model's backbone of one modality, its pooling, and a linear layer over the labels."""

    def __init__(self, model, modality: str, num_labels: int):
        super().__init__()
        self.model, self.modality = model, modality
        self.classifier = nn.Linear(model._combined_dim(modality), num_labels)

    def forward(self, labels=None, **inputs):
        mask = torch.ones(inputs["utterance_mask"].shape, dtype=torch.bool, device=inputs["utterance_mask"].device)
        embeds = self.model.embed_utterances(self.modality, mask, **inputs)[:, 0]
        if self.modality in self.model.layer_combiners:  # every layer pooled: combine them as the model does
            embeds = self.model.layer_combiners[self.modality](embeds)
        logits = self.classifier(embeds)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _utterances(dataset: Dataset, modality: str) -> list[dict]:
    """The labelled utterances of `dataset` that have `modality` (not missing or blank), as `{<utterance key>: value,
    "label": id, "where": "conversation 'x', turn t"}`."""
    column, key = MODALITY_TABLE[modality].column, MODALITY_TABLE[modality].key
    return [
        {key: value, "label": label, "where": f"conversation {row['conversation_id']!r}, turn {turn}"}
        for row in dataset
        for value, label, turn in zip(row[column], row["labels"], row.get("turns") or range(len(row[column])))
        if label != UNLABELLED and not is_blank(value)
    ]


def finetune_backbone(model, processor, modality: str, datasets, method: str = "lora", epochs: float = 2.0,
                      learning_rate: float = 2e-5, lora_r: int = 8, lora_alpha: int = 16, batch_size: int = 8,
                      output_dir: str = "finetuning", seed: int = 0, gradient_checkpointing: bool = False,
                      **training_arguments) -> dict:
    """Fine-tunes `model`'s `modality` backbone in place on the utterances of `datasets["train"]`; returns the
    training metrics. `method` is `"full"` (every backbone weight) or `"lora"` (low-rank adapters, merged after).

    Settings that cannot work are refused first (`check_finetuning_settings`); training stops with a `TrainingError`
    at the first non-finite loss or gradient, and a backbone left with non-finite weights is refused.

    `gradient_checkpointing` recomputes the backbone's activations in the backward pass (less memory, more time);
    `training_arguments` go to the fine-tuning `TrainingArguments` (e.g. `bf16=True`). In several processes
    (`torchrun`), the fine-tuning is distributed like any `Trainer` run."""
    check_finetuning_settings(method, epochs, learning_rate, lora_r, lora_alpha, getattr(model.config, "head",
                                                                                        "classification"))
    backbone = getattr(model, f"{modality}_backbone", None)
    if backbone is None:
        raise MisterEError(f"The model has no {modality} backbone to fine-tune.")
    if "train" not in datasets:
        raise MisterEError(f"Backbone fine-tuning needs a train split; the data has {list(datasets)}.")
    train = _utterances(datasets["train"], modality)
    if not train:
        raise TrainingError(f"No labelled {modality} utterances in the training split to fine-tune on.")
    freeze_flag = f"freeze_{modality}_backbone"
    frozen = getattr(model.config, freeze_flag)
    setattr(model.config, freeze_flag, False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        adapted = get_peft_model(backbone, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear"))
        setattr(model, f"{modality}_backbone", adapted)
    else:
        backbone.requires_grad_(True)

    if gradient_checkpointing:
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            raise MisterEError(f"The {modality} backbone ({type(backbone).__name__}) does not support gradient "
                               "checkpointing.")
        backbone.activation_checkpointing_enable({"use_reentrant": False})
    classifier = UtteranceClassifier(model, modality, model.config.num_labels)
    for name, parameter in model.named_parameters():  # only the backbone (or its adapters) and the classifier learn
        if not name.startswith(f"{modality}_backbone."):
            parameter.requires_grad_(False)

    key = MODALITY_TABLE[modality].key

    def collate(items):
        try:
            batch = dict(processor(conversations=[[{key: i[key]}] for i in items], modalities=[modality]))
        except ConversationInputError as error:
            if error.conversation is None:
                raise
            raise error.named(f"{modality} fine-tuning, {items[error.conversation]['where']}") from None
        batch["labels"] = torch.tensor([i["label"] for i in items])
        return batch

    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, save_strategy="no", logging_strategy="epoch", report_to="none",
        remove_unused_columns=False, seed=seed, warmup_steps=0.1, **training_arguments,
    )
    trainer = _FinetuningTrainer(model=classifier, args=args, train_dataset=Dataset.from_list(train),
                                 data_collator=collate)
    try:
        metrics = trainer.train().metrics
    except TrainingError as error:
        raise TrainingError(f"{modality} backbone fine-tuning ({method}): {error}") from None
    if method == "lora":
        setattr(model, f"{modality}_backbone", getattr(model, f"{modality}_backbone").merge_and_unload())
    bad = _non_finite(dict(getattr(model, f"{modality}_backbone").named_parameters()))
    if bad:  # finite gradients can still step a weight to infinity
        raise TrainingError(f"{modality} backbone fine-tuning ({method}) left {len(bad)} weights holding NaN or "
                            f"infinite values ({bad[:5]}{' ...' if len(bad) > 5 else ''}); lower the fine-tuning "
                            "learning rate.")
    if gradient_checkpointing:
        getattr(model, f"{modality}_backbone").activation_checkpointing_disable()
    setattr(model.config, freeze_flag, frozen)
    for name, parameter in model.named_parameters():  # back to the model's own freezing
        backbone_of = next((m for m in model.config.modalities if name.startswith(f"{m}_backbone.")), None)
        parameter.requires_grad_(backbone_of is None or not getattr(model.config, f"freeze_{backbone_of}_backbone"))
    model.eval()
    return metrics


__all__ = ["finetune_backbone", "check_finetuning_settings", "finetuning_problems", "UtteranceClassifier"]
