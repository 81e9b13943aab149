"""The training losses of MiSTER-E, as plain functions over already-masked tensors.

The model selects the valid utterances (padding and missing modalities removed) before calling these, so every
function here sees only real data.
"""

import itertools

import torch
import torch.nn.functional as F


def focal_nll_loss(log_probs: torch.Tensor, labels: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Mean focal loss from log-probabilities.

    Args:
        log_probs: `(N, C)` log-probabilities.
        labels: `(N,)` class indices.
        gamma: focal exponent; 0 gives the negative log-likelihood (cross-entropy).
    """
    if log_probs.shape[0] == 0:
        return log_probs.new_zeros(())
    log_p = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    if gamma == 0:
        return -log_p.mean()
    return -(((1 - log_p.exp()) ** gamma) * log_p).mean()


def supervised_contrastive_loss(
    speech: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over paired speech/text utterance representations.

    The `2N` L2-normalised vectors (N speech, N text) are all anchors; for an anchor, every other vector with the same
    label is a positive (its paired other-modality vector among them), every other vector is in the denominator:

        L = -1/(2N) * sum_i 1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) )

    Args:
        speech: `(N, D)` speech representations of N utterances.
        text: `(N, D)` text representations of the same utterances, in the same order.
        labels: `(N,)` class indices.
        temperature: softmax temperature `t`.
    """
    n = labels.shape[0]
    if n == 0:
        return speech.new_zeros(())
    features = F.normalize(torch.cat([speech, text]), dim=-1)
    both_labels = torch.cat([labels, labels])
    logits = features @ features.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positives = (both_labels.unsqueeze(0) == both_labels.unsqueeze(1)) & ~self_mask
    positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)
    return -positive_log_prob.mean()


def symmetric_kl_consistency(log_probs: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
    """Mean symmetric KL divergence between the distributions of every pair of experts.

    Averaged over the (utterance, pair of experts) entries where both experts are available; 0 when the experts agree
    or fewer than two experts are available anywhere.

    Args:
        log_probs: `(N, E, C)` log-probabilities of E experts for N utterances.
        expert_mask: `(N, E)` boolean, True where an expert is available.
    """
    terms, counts = [], []
    for i, j in itertools.combinations(range(log_probs.shape[1]), 2):
        both = expert_mask[:, i] & expert_mask[:, j]
        p, q = log_probs[both, i], log_probs[both, j]
        kl = (p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)
        terms.append(kl.sum())
        counts.append(both.sum())
    if not terms:
        return log_probs.new_zeros(())
    return torch.stack(terms).sum() / torch.stack(counts).sum().clamp_min(1)


def concordance_correlation(predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Lin's concordance correlation coefficient of two 1-D tensors (population statistics), differentiable:

        CCC = 2 cov(p, r) / (var(p) + var(r) + (mean(p) - mean(r)) ** 2)

    When both are the same constant (the formula's 0 / 0) it is 1: perfect agreement. A NaN or infinite value in
    either input makes it NaN (never a score), so a loss built on it is non-finite and training stops by name."""
    mean_p, mean_r = predictions.mean(), references.mean()
    cov = ((predictions - mean_p) * (references - mean_r)).mean()
    denominator = ((predictions - mean_p) ** 2).mean() + ((references - mean_r) ** 2).mean() + (mean_p - mean_r) ** 2
    # `== 0`, not `> 0`: a NaN denominator must give NaN, not the constant case's 1.
    constant = denominator == 0
    safe = torch.where(constant, torch.ones_like(denominator), denominator)
    return torch.where(constant, torch.ones_like(denominator), 2 * cov / safe)


def ccc_loss(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over dimensions of `1 - CCC`, each dimension over its labelled entries.

    Args:
        predictions, targets: `(N, D)` values.
        mask: `(N, D)` bool, True where a target exists.
        weights: `(D,)` weight of each dimension (default equal). Dimensions with fewer than 2 labelled entries
            (no defined correlation) are left out.
    """
    weights = torch.ones(predictions.shape[-1], device=predictions.device) if weights is None else weights
    terms, used = [], []
    for d in range(predictions.shape[-1]):
        if mask[:, d].sum() >= 2:
            terms.append(1 - concordance_correlation(predictions[mask[:, d], d], targets[mask[:, d], d]))
            used.append(weights[d])
    if not terms:
        return predictions.new_zeros(())
    used = torch.stack(used).to(predictions.dtype)
    return (torch.stack(terms) * used).sum() / used.sum()


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher/student distillation (Hinton et al., 2015): mean over rows of
    `T^2 * KL(softmax(teacher / T) || softmax(student / T))`; the teacher is not trained by it (detached).

    Args:
        teacher_logits, student_logits: `(N, C)`.
    """
    if teacher_logits.shape[0] == 0:
        return student_logits.new_zeros(())
    teacher = (teacher_logits.detach() / temperature).log_softmax(-1)
    student = (student_logits / temperature).log_softmax(-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1).mean()


__all__ = [
    "focal_nll_loss",
    "supervised_contrastive_loss",
    "symmetric_kl_consistency",
    "concordance_correlation",
    "ccc_loss",
    "distillation_kl",
]
