"""The sibling systems as plug-ins: guided gated fusion with distillation, and the regression head with CCC."""

import math

import numpy as np
import pytest
import torch
from helpers import TINY_HEAD, make_conversations, random_labels
from transformers import AutoModel

from mister_e_hf import MisterEConfig, MisterEModel
from mister_e_hf.losses import ccc_loss, distillation_kl
from mister_e_hf.streaming import StreamingEmotionRecognizer


def reference_distillation(teacher_rows, student_rows, temperature):
    total = 0.0
    for teacher, student in zip(teacher_rows, student_rows):
        p = [math.exp(t / temperature) for t in teacher]
        q = [math.exp(s / temperature) for s in student]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += temperature**2 * sum(a * math.log(a / b) for a, b in zip(p, q))
    return total / len(teacher_rows)


def reference_ccc(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    vx = sum((a - mx) ** 2 for a in x) / len(x)
    vy = sum((b - my) ** 2 for b in y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / len(x)
    return 2 * cov / (vx + vy + (mx - my) ** 2)


def test_distillation_and_ccc_match_references():
    teacher = [[2.0, 0.5, -1.0], [0.0, 0.1, 0.2]]
    student = [[1.0, 1.0, 0.0], [0.3, -0.2, 0.9]]
    for temperature in (1.0, 2.0, 4.0):
        loss = distillation_kl(torch.tensor(teacher, dtype=torch.float64), torch.tensor(student, dtype=torch.float64),
                               temperature)
        assert loss.item() == pytest.approx(reference_distillation(teacher, student, temperature), rel=1e-9)

    predictions = [[0.1, 1.0], [0.5, 0.2], [0.9, -0.4], [0.3, 0.0]]
    targets = [[0.0, 0.8], [0.6, float("nan")], [1.0, -0.5], [0.2, 0.1]]
    p, t = torch.tensor(predictions, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    loss = ccc_loss(p, t.nan_to_num(0.0), ~t.isnan(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    dim0 = 1 - reference_ccc([r[0] for r in predictions], [r[0] for r in targets])
    dim1 = 1 - reference_ccc([predictions[i][1] for i in (0, 2, 3)], [targets[i][1] for i in (0, 2, 3)])
    assert loss.item() == pytest.approx((dim0 + 3 * dim1) / 4, rel=1e-9)
    assert ccc_loss(p, p, torch.ones_like(p, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-12)


def test_guided_gated_fusion_shapes_masks_gradients_and_distillation(build):
    model, processor = build("wav2vec2", "bert", fusion="guided-gated")
    assert model.expert_names == ["speech", "text", "speech+text", "joint"]
    for layer in model.fusion.modules():  # larger weights: experts that disagree, so that distillation is not ~0
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.5)
    conversations = make_conversations([3, 2], seed=51)
    conversations[0][1].pop("audio")
    inputs = processor(conversations=conversations)
    model, inputs = model.double(), {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    labels = random_labels(inputs, seed=2)
    captured = {}
    model.fusion.register_forward_hook(lambda module, args, output: captured.setdefault("fusion", output))
    model.train()
    out = model(**inputs, labels=labels)
    assert out.expert_logits.shape == (2, 3, 4, 4) and out.gate_weights.shape == (2, 3, 4)
    real = inputs["utterance_mask"].bool()
    torch.testing.assert_close(out.gate_weights.sum(-1)[real], torch.ones(int(real.sum()), dtype=torch.float64))
    assert out.gate_weights[0, 1].tolist()[0] == 0.0 and out.gate_weights[0, 1, 2:].sum() == 0  # no audio
    assert out.gate_weights[0, 1, 1].item() == pytest.approx(1.0)

    teacher, students, student_mask = captured["fusion"].distillation
    keep = student_mask & real.unsqueeze(-1)
    rows_t = teacher.unsqueeze(2).expand_as(students)[keep].double().tolist()
    rows_s = students[keep].double().tolist()
    expected = reference_distillation(rows_t, rows_s, model.config.distillation_temperature)
    assert expected > 1e-3 and out.distillation_loss.item() == pytest.approx(expected, rel=1e-9)
    assert keep.sum() == 3 * 4  # 4 utterances with both modalities (the one without audio has no teacher)

    out.loss.backward()
    for name in ("inputs", "enhance", "fuse", "guide", "joint", "classifiers", "gate"):
        grads = [p.grad for p in getattr(model.fusion, name).parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert all(model.fusion.classifiers[n][1].weight.grad.abs().sum() > 0 for n in model.expert_names)


def test_guided_gated_round_trips_and_streams(build, tmp_path):
    model, processor = build("wav2vec2", "bert", fusion="guided-gated", context_bidirectional=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    conversation = make_conversations([4], seed=52)[0]
    inputs = processor(conversations=[conversation])
    with torch.no_grad():
        offline = model(**inputs)
        assert torch.equal(loaded(**inputs).logits, offline.logits)
    recognizer = StreamingEmotionRecognizer(model, processor)
    for turn, utterance in enumerate(conversation):
        scores = recognizer.push(utterance).scores
        expected = offline.logits[0, turn].exp()
        torch.testing.assert_close(torch.tensor([scores[model.config.id2label[i]] for i in range(4)]), expected,
                                   atol=1e-5, rtol=0)


def test_text_only_guided_gated_is_one_expert(build):
    model, processor = build(None, "bert", fusion="guided-gated")
    assert model.expert_names == ["text"]
    out = model(**processor(conversations=make_conversations([2], seed=53, with_audio=False)))
    assert out.gate_weights.shape == (1, 2, 1)


def regression_config(**overrides):
    return MisterEConfig(speech_embed_dim=32, text_embed_dim=24, head="regression",
                         id2label={0: "valence", 1: "arousal"}, **{**TINY_HEAD, **overrides, "num_labels": 2})


def synthetic_dimensions(n_conversations=48, turns=5, seed=0):
    """Valence and arousal as known smooth functions of the speech and text embeddings."""
    rng = np.random.default_rng(seed)
    speech = rng.standard_normal((n_conversations, turns, 32)).astype(np.float32)
    text = rng.standard_normal((n_conversations, turns, 24)).astype(np.float32)
    valence = np.tanh(speech[..., 0] - 0.5 * speech[..., 1] + 0.8 * text[..., 0])
    arousal = np.tanh(0.7 * speech[..., 2] + text[..., 1] - text[..., 2])
    return torch.from_numpy(speech), torch.from_numpy(text), torch.from_numpy(np.stack([valence, arousal], -1))


@pytest.mark.parametrize("fusion", ["mister-e", "guided-gated"])
def test_regression_head_learns_a_synthetic_valence_function(fusion):
    from mister_e_hf.metrics import concordance_correlation_coefficient

    torch.manual_seed(0)
    model = MisterEModel(regression_config(fusion=fusion, dropout=0.0, projection_dim=32))
    speech, text, targets = synthetic_dimensions(240)
    labels = targets.clone()
    labels[0, 0, 1] = float("nan")  # a missing value is simply not scored
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, test = 200, slice(200, 240)
    for step in range(800):
        batch = slice((step * 16) % train, (step * 16) % train + 16)
        out = model(speech_embeds=speech[batch], text_embeds=text[batch], labels=labels[batch])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.kl_loss is None and out.supcon_loss is None
    model.eval()
    with torch.no_grad():
        predicted = model(speech_embeds=speech[test], text_embeds=text[test]).logits
    assert predicted.shape == (40, 5, 2)
    for d in range(2):
        ccc = concordance_correlation_coefficient(predicted[..., d].numpy(), targets[test][..., d].numpy())
        assert ccc > 0.9, (fusion, d, ccc)


def test_regression_labels_are_checked():
    model = MisterEModel(regression_config())
    speech, text, targets = synthetic_dimensions(2, 3)
    with pytest.raises(ValueError, match=r"shape \(batch, utterances, dimensions\) = \(2, 3, 2\)"):
        model(speech_embeds=speech, text_embeds=text, labels=targets[..., 0])
    with pytest.raises(ValueError, match="must be floats"):
        model(speech_embeds=speech, text_embeds=text, labels=targets.long())
    with pytest.raises(Exception, match="ccc_weights"):
        MisterEModel(regression_config(ccc_weights=[1.0, 2.0, 3.0]))


def test_run_erc_trains_a_regression_head_from_manifest_columns(tmp_path, tiny_backbones, corpus):
    """`--head regression --label_columns ...` through the whole training script, on numeric per-turn columns."""
    import json

    from helpers import common_args, run_erc

    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        lines = [json.loads(line) for line in (corpus / f"{split}.jsonl").read_text().splitlines()]
        for line in lines:  # valence follows the labels' cue (angry < calm < happy), arousal is noisy
            line["valence"] = {"angry": -0.8, "calm": 0.1, "happy": 0.9}[line["label"]] + 0.05 * rng.standard_normal()
            line["arousal"] = "" if line["turn"] == 1 else float(rng.uniform(-1, 1))  # some values missing
            line["audio"] = str(corpus / line["audio"])
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = common_args(tiny_backbones, tmp_path, tmp_path / "run", tmp_path / "cache")
    result = run_erc(*args, "--head", "regression", "--label_columns", "valence,arousal", "--num_train_epochs", "8",
                     "--learning_rate", "3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert {"test_ccc_valence", "test_ccc_arousal", "test_ccc_mean", "test_mae_valence"} <= set(test)
    assert test["test_ccc_valence"] > 0.0  # positively related (learning itself: the synthetic test above)
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert "eval_ccc_mean" in state["log_history"][-2] or any("eval_ccc_mean" in e for e in state["log_history"])
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert {r.metric_type for r in card.data.eval_results} >= {"ccc_mean", "ccc_valence", "ccc_arousal"}
    assert "regression" in card.text
