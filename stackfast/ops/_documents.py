"""Documents packed into one sequence, described by their ids: plain PyTorch (no triton), for
the attention kernels' launcher, their reference and the model's PyTorch path.

document_ids: (batch, seqlen) integers, non-decreasing in each row (e.g. the count of EOS
tokens before each position). A document is a run of equal ids: an id that comes back after
another starts a new document.
"""
import torch


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end), int32 (batch, seqlen): for each position the first position of its document
    and the position past its last. No host sync."""
    batch, seqlen = document_ids.shape
    position = torch.arange(seqlen, device=document_ids.device, dtype=torch.int32).expand(batch, seqlen)
    first = torch.ones(batch, seqlen, dtype=torch.bool, device=document_ids.device)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, position, 0).cummax(1).values
    # the nearest document end at or after each position: a running minimum from the right
    end = torch.where(last, position + 1, seqlen).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def same_document(document_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen, seqlen) bool: query row i and key column j lie in the same document."""
    start, _ = document_bounds(document_ids)
    return start[:, :, None] == start[:, None, :]
