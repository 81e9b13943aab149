"""Model cards for trained MiSTER-E checkpoints, filled from what a run measured (nothing typed by hand)."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


def write_model_card(output_dir, model, dataset: str, label_names, results: dict, training_args=None, data_report=None):
    """Writes `README.md` in `output_dir`: backbones, labels, measured results (also as `model-index` metadata)."""
    config = model.config
    eval_results = [
        EvalResult(task_type="audio-classification", task_name="Emotion Recognition in Conversations",
                   dataset_type=dataset, dataset_name=dataset, dataset_split=split, metric_type=metric,
                   metric_name=metric.replace("_", " "), metric_value=round(float(results[f"{prefix}_{metric}"]), 4))
        for split, prefix in (("validation", "eval"), ("test", "test"))
        for metric in ("weighted_f1", "accuracy", "macro_f1")
        if f"{prefix}_{metric}" in results
    ]
    data = ModelCardData(library_name="transformers", tags=["emotion-recognition", "mister-e", "multimodal"],
                         model_name=Path(output_dir).name, eval_results=eval_results or None)
    lines = [
        f"# {Path(output_dir).name}",
        "",
        "MiSTER-E (Mixture of Speech-Text Experts for Recognition of Emotions) trained with `mister_e_hf`.",
        "",
        f"- speech backbone: {config.speech_backbone_name_or_path or 'none'}",
        f"- text backbone: {config.text_backbone_name_or_path or 'none'}",
        f"- dataset: {dataset}; labels: {', '.join(label_names)}",
        f"- experts: {', '.join(model.expert_names)}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in sorted(results.items()) if isinstance(v, float)],
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")
    card.save(str(Path(output_dir) / "README.md"))
    return card


__all__ = ["write_model_card"]
