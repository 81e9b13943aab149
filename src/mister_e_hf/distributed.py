"""What the toolkit needs of `torch.distributed` when several processes train one model (`torchrun`,
`accelerate launch`; `Trainer` sets the process group up):

- `rank()`, `world_size()`, `barrier()`, `all_gather_objects()`: no-ops (rank 0 of 1) in a single process;
- `gather_for_loss(...)`: the head's loss inputs of every process's batch, concatenated, so that each process computes
  the loss of the *global* batch. Batch-level losses (the supervised contrastive loss, CCC) then see the same
  utterances as a single process with the same global batch, and per-utterance means are weighted by the whole
  batch's labelled utterances, not averaged per process. The local slice keeps its gradient, scaled by the number
  of processes, so that DDP's gradient average gives exactly the gradient of the global loss.
"""

import dataclasses

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(value) -> list:
    """`[value of rank 0, value of rank 1, ...]` (picklable values); `[value]` in a single process."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _gather_tensor(tensor: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Every rank's `(batch_r, utterances_r, ...)` tensor, padded with zeros to the largest batch and utterance
    count, gathered and concatenated along the batch: `(sum batch_r, max utterances_r, ...)`. The local slice
    carries the gradient, `world_size` times (see the module's docstring); the others are constants."""
    world, me = dist.get_world_size(), dist.get_rank()
    batch, utterances = max(b for b, _ in sizes), max(u for _, u in sizes)
    floating = tensor.is_floating_point()
    local = tensor if floating else tensor.to(torch.int64)
    padded = local.new_zeros((batch, utterances, *local.shape[2:]))
    padded[: local.shape[0], : local.shape[1]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    pieces = [part[:b] for part, (b, _) in zip(parts, sizes)]
    if floating and tensor.requires_grad:  # value: the local slice; gradient: world_size times the local one
        scaled = local * world - local.detach() * (world - 1)
        missing = utterances - scaled.shape[1]
        if missing:
            scaled = torch.cat([scaled, scaled.new_zeros((scaled.shape[0], missing, *scaled.shape[2:]))], dim=1)
        pieces[me] = scaled
    gathered = torch.cat(pieces)
    return gathered if floating else gathered.to(tensor.dtype)


def gather_for_loss(logits: torch.Tensor, fusion, labels: torch.Tensor, utterance_mask: torch.Tensor):
    """`(logits, fusion, labels, utterance_mask)` of the global batch (every process's conversations, in rank
    order; padding utterances masked out), for `Head.losses`. The fusion's tensors (fields, and tuples of fields)
    must be `(batch, utterances, ...)`, as `FusionOutput` documents; its `aux_losses` stay local (DDP averages them
    over processes, as for any model). As given in a single process."""
    if not is_distributed():
        return logits, fusion, labels, utterance_mask
    shape = torch.tensor(utterance_mask.shape[:2], dtype=torch.int64, device=utterance_mask.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    sizes = [tuple(s.tolist()) for s in shapes]

    def gather(value):
        if isinstance(value, torch.Tensor):
            return _gather_tensor(value, sizes)
        if isinstance(value, tuple):
            return tuple(gather(item) for item in value)
        return value  # None, or aux_losses (a dict): local

    fields = {field.name: gather(getattr(fusion, field.name)) for field in dataclasses.fields(fusion)
              if field.name != "aux_losses"}
    return (gather(logits), dataclasses.replace(fusion, **fields), gather(labels), gather(utterance_mask))


__all__ = ["all_gather_objects", "barrier", "gather_for_loss", "is_distributed", "rank", "world_size"]
