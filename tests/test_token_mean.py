"""The reply-token mean: an optimizer step learns the mean over every reply token of its window, however the window's
tokens are cut into micro-batches or spread over ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mllm_safety.train.token_mean import ReplyTokenMean

# Micro-batches of different reply lengths (1, 3 and 8 tokens): a mean of means would weigh them differently.
FEATURES = torch.linspace(-1.0, 2.0, 12 * 3).reshape(12, 3)
TARGETS = torch.linspace(0.5, -1.5, 12)
LENGTHS = (1, 3, 8)


def token_losses(weight: torch.Tensor, rows: slice) -> torch.Tensor:
    return (FEATURES[rows] @ weight - TARGETS[rows]) ** 2


def reference(rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean token loss of ``rows`` taken as one batch on one device, and its gradient."""
    weight = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    loss = token_losses(weight, rows).mean()
    loss.backward()
    return loss.detach(), weight.grad


def accumulate(token_mean: ReplyTokenMean, weight: torch.Tensor, cuts: list[slice], accumulate_grad_batches: int):
    """One micro-batch per cut, backpropagated as Lightning does it: the returned loss divided by the accumulation."""
    for rows in cuts:
        losses = token_losses(weight, rows)
        loss_sum = token_mean.add(losses.mean(), torch.tensor(len(losses)))
        (loss_sum / accumulate_grad_batches).backward()


def micro_batches(lengths: tuple[int, ...], start: int = 0) -> list[slice]:
    bounds = [start + sum(lengths[:k]) for k in range(len(lengths) + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def test_accumulated_micro_batches_learn_the_mean_over_all_their_tokens():
    weight = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    token_mean = ReplyTokenMean()
    accumulate(token_mean, weight, micro_batches(LENGTHS), len(LENGTHS))
    mean_of_means = weight.grad.clone()
    loss, tokens = token_mean.finish([weight, frozen], len(LENGTHS))

    expected_loss, expected_grad = reference()
    assert not torch.allclose(mean_of_means, expected_grad), "the lengths must differ for this test to mean anything"
    torch.testing.assert_close(weight.grad, expected_grad)
    torch.testing.assert_close(loss, expected_loss)
    assert tokens.item() == sum(LENGTHS)
    assert frozen.grad is None, "a frozen weight gets no gradient"


def test_each_optimizer_step_averages_its_own_window_only():
    weight = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    token_mean = ReplyTokenMean()
    accumulate(token_mean, weight, micro_batches((3, 8)), 2)
    token_mean.finish([weight], 2)
    weight.grad = None

    accumulate(token_mean, weight, [slice(11, 12)], 1)  # the next window: one micro-batch of one token
    loss, tokens = token_mean.finish([weight], 1)
    expected_loss, expected_grad = reference(slice(11, 12))
    torch.testing.assert_close(weight.grad, expected_grad)
    torch.testing.assert_close(loss, expected_loss)
    assert tokens.item() == 1


def test_a_window_without_reply_tokens_logs_a_zero_loss_not_nan():
    weight = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    token_mean = ReplyTokenMean()
    token_mean.add((weight * 0).sum(), torch.tensor(0)).backward()  # every token of the window was cut off
    loss, tokens = token_mean.finish([weight], 1)
    assert loss.item() == 0.0 and tokens.item() == 0
    assert torch.equal(weight.grad, torch.zeros(3))


def _rank(rank: int, init_file: str, cuts: list[list[slice]], accumulate_grad_batches: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(cuts))
    try:
        weight = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
        token_mean = ReplyTokenMean()
        accumulate(token_mean, weight, cuts[rank], accumulate_grad_batches)
        dist.all_reduce(weight.grad)  # DDP averages the gradients over ranks
        weight.grad /= len(cuts)
        loss, tokens = token_mean.finish([weight], accumulate_grad_batches)
        torch.save({"grad": weight.grad, "loss": loss, "tokens": tokens}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_with_different_token_counts_learn_the_mean_over_every_rank_s_tokens(tmp_path):
    # rank 0: micro-batches of 1 and 3 tokens; rank 1: 6 and 2 (two micro-batches each, 12 tokens in all)
    cuts = [micro_batches((1, 3)), micro_batches((6, 2), start=4)]
    args = (str(tmp_path / "init"), cuts, 2, str(tmp_path / "rank"))
    other = mp.get_context("spawn").Process(target=_rank, args=(1, *args))
    other.start()
    _rank(0, *args)  # rank 0 in this process
    other.join(timeout=120)
    assert other.exitcode == 0
    expected_loss, expected_grad = reference()
    for rank in range(2):
        result = torch.load(f"{tmp_path / 'rank'}.{rank}")
        torch.testing.assert_close(result["grad"], expected_grad)
        torch.testing.assert_close(result["loss"], expected_loss)
        assert result["tokens"].item() == 12


def test_a_window_past_float32_s_exact_integers_keeps_its_mean():
    """2**24 tokens (a large data-parallel step) is where float32 stops counting one by one: the sums are float64."""
    token_mean = ReplyTokenMean()
    token_mean.add(torch.tensor(1.0), torch.tensor(2**24))
    token_mean.add(torch.tensor(3.0), torch.tensor(1))
    loss, _ = token_mean.finish([], 1)
    assert loss.item() == torch.tensor((2**24 + 3) / (2**24 + 1)).float().item()
