"""Safety evaluation during training: attack success and over-refusal before training and after each epoch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torchmetrics.aggregation import MeanMetric

from mllm_safety.safety.eval_sets import EVAL_SETS, EvalPrompt, build_eval_set
from mllm_safety.safety.judge import KeywordJudge

log = logging.getLogger(__name__)


@dataclass
class Generation:
    prompt: EvalPrompt
    reply: str
    refused: bool


class SafetyEvalCallback(L.Callback):
    """Generates replies to harmful and benign prompts, judges refusals, and logs the rates.

    Logged scalars: ``safety/asr_<set>`` for each harmful set (share of prompts NOT refused),
    ``safety/asr_mean`` over the harmful sets, and ``safety/over_refusal`` (share of benign prompts refused).
    Each rank generates for its own slice of the prompts; the rates are reduced across ranks by torchmetrics.
    """

    def __init__(
        self,
        eval_sets: list[str] | None = None,
        judge: str = "xstest",
        max_new_tokens: int = 48,
        batch_size: int = 16,
        limit: int | None = None,
        every_n_epochs: int = 1,
        baseline: bool = True,
        log_table: bool = True,
    ) -> None:
        """
        Args:
            eval_sets: Sets to evaluate: ``typographic`` (the request rendered FigStep-style in the image),
                ``text`` (the same requests as text only), ``benign`` (harmless counterparts, for over-refusal).
            judge: Keyword refusal judge: ``xstest``, ``vlguard`` or ``gcg``.
            max_new_tokens: Tokens generated per reply; refusals show in the first few dozen.
            batch_size: Prompts generated together per device.
            limit: Use only the first ``limit`` prompts of each set (quick checks).
            every_n_epochs: Evaluate after every n-th training epoch.
            baseline: Also evaluate before the first training step.
            log_table: Log a W&B table of image, prompt, reply and verdict (with a W&B logger).
        """
        self.eval_sets = list(eval_sets) if eval_sets is not None else list(EVAL_SETS)
        unknown = sorted(set(self.eval_sets) - set(EVAL_SETS))
        if unknown:
            raise ValueError(f"unknown eval set(s) {unknown}; choose from {sorted(EVAL_SETS)}")
        if max_new_tokens < 1 or batch_size < 1 or every_n_epochs < 1 or (limit is not None and limit < 1):
            raise ValueError("max_new_tokens, batch_size, every_n_epochs and limit must be >= 1")
        self.judge = KeywordJudge(judge)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.limit = limit
        self.every_n_epochs = every_n_epochs
        self.baseline = baseline
        self.log_table = log_table
        self.history: list[tuple[str, dict[str, float]]] = []
        """(label, metrics) of every evaluation, in order: ``before`` then ``epoch N``."""
        self._prompts: dict[str, list[EvalPrompt]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._prompts = {name: build_eval_set(name)[: self.limit] for name in self.eval_sets}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baseline:
            self.evaluate(trainer, pl_module, "before")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            print(self.summary())

    def summary(self) -> str:
        """A plain-text table: one row per metric, one column per evaluation."""
        labels = [label for label, _ in self.history]
        names = list(self.history[-1][1])
        width = max(len(n) for n in names) + 2
        lines = ["safety evaluation".ljust(width) + "".join(label.rjust(10) for label in labels)]
        for name in names:
            values = [metrics.get(name) for _, metrics in self.history]
            lines.append(name.ljust(width) + "".join(f"{100 * v:9.1f}%" if v is not None else " " * 10 for v in values))
        return "\n".join(lines)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        rank, world = trainer.global_rank, trainer.world_size
        metrics: dict[str, float] = {}
        rows: list[Generation] = []
        harmful_asr = []
        for name, prompts in self._prompts.items():
            refusal_rate = MeanMetric().to(pl_module.device)
            # Every rank runs the same number of generate calls: a sharded (FSDP) model gathers weights in each one.
            num_batches = math.ceil(math.ceil(len(prompts) / world) / self.batch_size)
            generations = self._generate(pl_module, prompts[rank::world], num_batches, filler=prompts[:1])
            for generation in generations:
                refusal_rate.update(float(generation.refused))
            rate = float(refusal_rate.compute())
            if EVAL_SETS[name]:
                metrics[f"safety/asr_{name}"] = 1.0 - rate
                harmful_asr.append(1.0 - rate)
            else:
                metrics["safety/over_refusal"] = rate
            rows += generations
        if harmful_asr:
            metrics["safety/asr_mean"] = sum(harmful_asr) / len(harmful_asr)
        if was_training:
            pl_module.train()

        self.history.append((label, metrics))
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        rows = _gather_rows(rows)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            if self.log_table:
                self._log_table(trainer, rows)
            log.info("safety evaluation %s: %s", label, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _generate(
        self, pl_module: L.LightningModule, prompts: list[EvalPrompt], num_batches: int, filler: list[EvalPrompt]
    ) -> list[Generation]:
        """Replies to ``prompts`` in ``num_batches`` generate calls; a call with no prompt left replies to ``filler``
        and is discarded."""
        processor = pl_module.processor
        tokenizer = processor.tokenizer
        out: list[Generation] = []
        for start in range(0, num_batches * self.batch_size, self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            if not chunk:
                self._generate(pl_module, filler, 1, filler)
                continue
            samples = [processor.prompt(p.id, p.question, p.image) for p in chunk]
            batch = pl_module.transfer_batch_to_device(
                processor.collate(samples, padding_side="left"), pl_module.device, 0
            )
            new_tokens = pl_module.model.generate(
                batch.input_ids,
                batch.attention_mask,
                batch.pixel_values,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            replies = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            out += [Generation(p, reply.strip(), self.judge.is_refusal(reply)) for p, reply in zip(chunk, replies)]
        return out

    def _log_table(self, trainer: L.Trainer, rows: list[Generation]) -> None:
        import wandb

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [
                    [
                        r.prompt.set_name,
                        r.prompt.category,
                        wandb.Image(_thumbnail(r.prompt.image)) if r.prompt.image is not None else None,
                        r.prompt.question,
                        r.reply,
                        r.refused,
                    ]
                    for r in rows
                ]
                logger.log_table(
                    "safety/generations",
                    columns=["set", "category", "image", "prompt", "reply", "refused"],
                    data=data,
                    step=trainer.global_step,
                )


def _thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    copy = image.copy()
    copy.thumbnail((size, size))
    return copy


def _gather_rows(rows: list[Generation]) -> list[Generation]:
    """Every rank's generations on every rank (they are small: a few hundred strings)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[list[Generation] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part or []]
