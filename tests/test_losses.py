"""The losses against independent, loop-based reference computations on small hand-made batches."""

import math

import numpy as np
import pytest
import torch
from helpers import make_conversations, random_labels

from mister_e_hf.losses import focal_nll_loss, supervised_contrastive_loss, symmetric_kl_consistency


def reference_supcon(speech, text, labels, temperature):
    """Khosla et al.'s supervised contrastive loss over the 2N speech+text vectors, written out with loops."""
    vectors = [np.asarray(v, dtype=np.float64) for v in [*speech, *text]]
    vectors = [v / np.linalg.norm(v) for v in vectors]
    all_labels = list(labels) * 2
    total = 0.0
    for i, anchor in enumerate(vectors):
        denominator = sum(math.exp(anchor @ vectors[k] / temperature) for k in range(len(vectors)) if k != i)
        positives = [p for p in range(len(vectors)) if p != i and all_labels[p] == all_labels[i]]
        total += -sum(math.log(math.exp(anchor @ vectors[p] / temperature) / denominator) for p in positives) / len(
            positives
        )
    return total / len(vectors)


def reference_kl(probabilities, available):
    """Mean over (utterance, expert pair) of KL(p||q) + KL(q||p), for pairs where both experts are available."""
    total, count = 0.0, 0
    for utterance, mask in zip(probabilities, available):
        for i in range(len(utterance)):
            for j in range(i + 1, len(utterance)):
                if mask[i] and mask[j]:
                    p, q = utterance[i], utterance[j]
                    total += sum(a * math.log(a / b) + b * math.log(b / a) for a, b in zip(p, q))
                    count += 1
    return total / count


def test_supcon_matches_reference():
    speech = [[1.0, 0.0, 0.5], [0.2, 1.0, -0.3], [0.9, 0.1, 0.4], [-0.5, 0.3, 1.0]]
    text = [[0.8, 0.2, 0.1], [0.0, 0.9, 0.0], [1.0, -0.2, 0.3], [0.1, 0.1, 0.9]]
    labels = [0, 1, 0, 2]
    for temperature in (0.1, 0.5, 1.0):
        loss = supervised_contrastive_loss(
            torch.tensor(speech, dtype=torch.float64), torch.tensor(text, dtype=torch.float64), torch.tensor(labels),
            temperature,
        )
        assert loss.item() == pytest.approx(reference_supcon(speech, text, labels, temperature), rel=1e-9)


def test_supcon_rewards_aligned_pairs():
    labels = torch.tensor([0, 1, 2])
    aligned = torch.eye(3, dtype=torch.float64)
    shuffled = aligned[[1, 2, 0]]
    assert supervised_contrastive_loss(aligned, aligned, labels, 0.5) < supervised_contrastive_loss(
        aligned, shuffled, labels, 0.5
    )


def test_kl_matches_reference_with_masked_experts():
    probabilities = [
        [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]],
        [[0.3, 0.3, 0.4], [0.6, 0.2, 0.2], [0.2, 0.5, 0.3]],
        [[0.25, 0.25, 0.5], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]],
    ]
    available = [[True, True, True], [False, True, False], [True, False, True]]
    log_probs = torch.tensor(probabilities, dtype=torch.float64).log()
    loss = symmetric_kl_consistency(log_probs, torch.tensor(available))
    assert loss.item() == pytest.approx(reference_kl(probabilities, available), rel=1e-9)


def test_kl_is_zero_when_experts_agree():
    agreeing = torch.tensor([[0.1, 0.6, 0.3]] * 3, dtype=torch.float64).log().unsqueeze(0).repeat(4, 1, 1)
    assert symmetric_kl_consistency(agreeing, torch.ones(4, 3, dtype=torch.bool)).item() == 0.0


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_smaller_above():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    log_probs = logits.log_softmax(-1)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert focal_nll_loss(log_probs, labels, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert focal_nll_loss(log_probs, labels, 2.0) < ce


def test_model_losses_equal_references_on_its_own_outputs(build):
    """The model feeds the losses exactly the real, labelled, paired utterances (padding and missing audio out)."""
    model, processor = build("wav2vec2", "bert")
    conversations = make_conversations([4, 2], seed=3)
    conversations[0][1].pop("audio")  # one utterance without audio: no speech expert, no contrastive pair
    inputs = processor(conversations=conversations)
    labels = random_labels(inputs, seed=5)
    labels[0, 3] = -100  # an unlabelled real utterance

    captured = {}
    model.fusion.register_forward_hook(lambda module, args, output: captured.update(fusion=output))
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    fusion = captured["fusion"]

    real = inputs["utterance_mask"].bool()
    keep = real & (labels != -100) & fusion.paired_mask
    speech, text = (x[keep].double().numpy() for x in fusion.paired)
    expected = reference_supcon(speech, text, labels[keep].tolist(), model.config.supcon_temperature)
    assert out.losses["supcon_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert keep.sum() == 4  # 6 real utterances - 1 unlabelled - 1 without audio

    probabilities = out.expert_logits[real].double().softmax(-1).tolist()
    assert out.losses["kl_loss"].item() == pytest.approx(reference_kl(probabilities, out.expert_mask[real].tolist()), rel=1e-5)

    labelled = real & (labels != -100)
    mixture = out.logits[labelled].exp()
    assert mixture.sum(-1) == pytest.approx(torch.ones(len(mixture)), abs=1e-6)
    expected_nll = -mixture[torch.arange(len(mixture)), labels[labelled]].log().mean()
    assert out.losses["mixture_loss"].item() == pytest.approx(expected_nll.item(), rel=1e-5)
    cfg = model.config
    total = out.losses["mixture_loss"] + cfg.expert_loss_weight * out.losses["expert_loss"] + cfg.supcon_weight * out.losses["supcon_loss"]
    assert out.loss.item() == pytest.approx((total + cfg.kl_weight * out.losses["kl_loss"]).item(), rel=1e-6)
