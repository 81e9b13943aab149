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
    model.fusion.register_forward_hook(lambda module, args, output: captured.update(fusion=output))
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
    assert expected > 1e-3 and out.losses["distillation_loss"].item() == pytest.approx(expected, rel=1e-9)
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


@pytest.mark.parametrize("fusion", ["mister-e", "guided-gated", "film-moe"])
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
    assert "kl_loss" not in out.losses and "supcon_loss" not in out.losses
    model.eval()
    with torch.no_grad():
        predicted = model(speech_embeds=speech[test], text_embeds=text[test]).logits
    assert predicted.shape == (40, 5, 2)
    for d in range(2):
        ccc = concordance_correlation_coefficient(predicted[..., d].numpy(), targets[test][..., d].numpy())
        assert ccc > 0.9, (fusion, d, ccc)


def test_regression_labels_are_checked():
    model = MisterEModel(regression_config()).eval()
    speech, text, targets = synthetic_dimensions(2, 3)
    with pytest.raises(ValueError, match=r"shape \(batch, utterances, dimensions\) = \(2, 3, 2\)"):
        model(speech_embeds=speech, text_embeds=text, labels=targets[..., 0])
    whole = targets.round()  # integer values (a score of 2) are values: cast, not refused
    torch.testing.assert_close(model(speech_embeds=speech, text_embeds=text, labels=whole.long()).loss,
                               model(speech_embeds=speech, text_embeds=text, labels=whole).loss)
    with pytest.raises(ValueError, match="booleans"):
        model(speech_embeds=speech, text_embeds=text, labels=targets > 0)
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


def test_film_moe_routes_each_dimension_and_text_modulates_the_acoustic_experts():
    torch.manual_seed(0)
    model = MisterEModel(regression_config(fusion="film-moe", num_film_experts=3)).eval()
    assert model.expert_names == ["film-1", "film-2", "film-3"]
    for layer in model.fusion.modules():  # larger weights so that routes and modulation differ visibly
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.5)
    speech, text, _ = synthetic_dimensions(2, 4)
    speech_mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        out = model(speech_embeds=speech, text_embeds=text, speech_mask=speech_mask)
        other_text = model(speech_embeds=speech, text_embeds=text.flip(0), speech_mask=speech_mask)
    assert out.gate_weights.shape == (2, 4, 3, 2)  # (batch, utterances, experts, dimensions)
    torch.testing.assert_close(out.gate_weights.sum(2), torch.ones(2, 4, 2))
    assert not torch.allclose(out.gate_weights[..., 0], out.gate_weights[..., 1])  # each dimension has its route
    assert out.expert_mask[0, 1].all()  # without audio the experts run on the text-made shift
    assert not torch.allclose(out.expert_logits, other_text.expert_logits)  # text modulates the experts


def test_text_views_are_gated_and_cached(tmp_path, tiny_backbones, tokenizer):
    """Multi-granularity text: transcript, emphasised words and description, fused by the intra-modal gate."""
    import json

    from mister_e_hf import MisterEProcessor
    from mister_e_hf.cache import add_cached_embeddings
    from mister_e_hf.data import DataCollatorForConversations, load_corpus

    speech, text = tiny_backbones
    views = ["text", "emphasis", "description"]
    model = MisterEModel.from_backbones(str(speech), str(text), freeze_speech_backbone=True, freeze_text_backbone=True,
                                        text_views=views, fusion="film-moe", **TINY_HEAD).eval()
    processor = MisterEProcessor.from_backbones(str(speech), str(text), text_views=views)
    conversation = [
        {"audio": np.zeros(8000, dtype=np.float32), "sampling_rate": 16000, "text": "oh great today",
         "emphasis": ["great"], "description": "she laughs"},
        {"audio": np.zeros(6000, dtype=np.float32), "sampling_rate": 16000, "text": "that is terrible"},
    ]
    inputs = processor(conversations=[conversation])
    assert inputs["input_ids"].shape[:3] == (1, 2, 3)
    assert inputs["text_view_mask"].tolist() == [[[1, 1, 1], [1, 0, 0]]]
    captured = {}
    model.text_views.register_forward_hook(lambda m, args, out: captured.update(views=args))
    with torch.no_grad():
        raw = model(**inputs)
    views_embeds, present = captured["views"]
    assert views_embeds.shape[2] == 3 and present[0, 1].tolist() == [True, False, False]
    assert views_embeds[0, 1, 1:].abs().sum() == 0  # missing views are zeros and weighed 0

    rows = [{"conversation_id": "c0", "turn": t, "text": u["text"], "label": "x", "audio": f"a{t}.wav",
             "emphasis": " ".join(u.get("emphasis", [])), "description": u.get("description", "")}
            for t, u in enumerate(conversation)]
    import soundfile

    for t, u in enumerate(conversation):
        soundfile.write(tmp_path / f"a{t}.wav", u["audio"], 16000)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets, _ = load_corpus("manifest", data_dir=tmp_path)
    cached, stats = add_cached_embeddings(model, processor, datasets, tmp_path / "cache")
    assert stats.utterances_embedded == 2 + 4  # two clips; texts: 2 transcripts, 1 emphasis, 1 description
    batch = DataCollatorForConversations(processor)([cached["train"][0]])
    assert batch["text_embeds"].shape[:3] == (1, 2, 3) and batch["text_view_mask"].tolist() == [[[1, 1, 1], [1, 0, 0]]]
    with torch.no_grad():
        from_cache = model(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(from_cache.logits, raw.logits, atol=1e-5, rtol=0)
    raw_batch = DataCollatorForConversations(processor)([datasets["train"][0]])
    with torch.no_grad():
        torch.testing.assert_close(model(**{k: v for k, v in raw_batch.items() if k != "labels"}).logits, raw.logits,
                                   atol=1e-5, rtol=0)


def test_regression_models_through_pipeline_and_streaming(build):
    from transformers import pipeline

    from mister_e_hf.pipeline import TASK

    model, processor = build("wav2vec2", "bert", head="regression", fusion="film-moe", context_bidirectional=False,
                             id2label={0: "valence", 1: "arousal", 2: "dominance"}, num_labels=3)
    conversation = make_conversations([3], seed=54)[0]
    (predictions,) = [pipeline(TASK, model=model, processor=processor)(conversation)]
    assert set(predictions[0]) == {"values", "gate_weights"}
    assert set(predictions[0]["values"]) == {"valence", "arousal", "dominance"}
    assert len(predictions[0]["gate_weights"]["film-1"]) == 3  # routed per dimension
    recognizer = StreamingEmotionRecognizer(model, processor)
    for utterance, expected in zip(conversation, predictions):
        streamed = recognizer.push(utterance)
        assert streamed.label is None
        assert streamed.scores == pytest.approx(expected["values"], abs=1e-5)
