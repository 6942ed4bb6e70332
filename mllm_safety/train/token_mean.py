"""The loss of an optimizer step: one mean over every reply token of all its micro-batches and all ranks.

A mean of per-micro-batch (or per-rank) means weighs a token of a short batch more than one of a long batch, so
accumulating k micro-batches, or splitting a batch over ranks, would change what is learned. The window's token
count is only known after its last micro-batch, so each micro-batch backpropagates its *sum* of token losses, and
the gradients are rescaled once, before the optimizer step, by ``k · world_size / tokens``: Lightning divides each
micro-batch's loss by ``k``, DDP and FSDP average gradients over ranks, and what remains is the gradient of
``sum of all token losses / number of tokens``, as on one device with the whole window as one batch. One all-reduce
of two numbers per optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ReplyTokenMean:
    """Accumulates reply-token loss sums and counts over an optimizer step's micro-batches, then finishes the step."""

    def __init__(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)

    def add(self, loss: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Record a micro-batch with token-mean ``loss`` over ``num_tokens``; returns its loss sum to backpropagate."""
        loss_sum = loss * num_tokens
        self.loss_sum = self.loss_sum.to(loss.device) + loss_sum.detach().double()
        self.tokens = self.tokens.to(loss.device) + num_tokens.detach().double()
        return loss_sum

    def finish(
        self, parameters: Iterable[torch.nn.Parameter], accumulate_grad_batches: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale the accumulated gradients to the window's token mean; returns its mean loss and token count (the
        same on every rank) and starts the next window. Every rank must call this once per optimizer step."""
        totals = torch.stack([self.loss_sum, self.tokens])
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
            world_size = torch.distributed.get_world_size()
        loss_sum, tokens = totals.unbind()
        scale = accumulate_grad_batches * world_size / tokens.clamp(min=1).item()
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(scale)
        self.loss_sum, self.tokens = torch.zeros_like(self.loss_sum), torch.zeros_like(self.tokens)
        return (loss_sum / tokens.clamp(min=1)).float(), tokens.float()
