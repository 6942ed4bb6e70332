"""Evaluation during training: attack success, over-refusal and utility before training and after each epoch."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from mllm_safety.data.image_slot import WordsInImageSlot
from mllm_safety.evaluation.generation import (
    Generation,
    GenerationSettings,
    check_image_slots,
    gather_generations,
    generate_for_rank,
)
from mllm_safety.evaluation.judge import KEYWORD_JUDGES, KeywordJudge
from mllm_safety.evaluation.metrics import (
    judge_and_reduce,
    mixed_codes,
    score_utility,
    set_judges,
    summarize,
)
from mllm_safety.evaluation.registry import BenchmarkSpec, load_sets
from mllm_safety.evaluation.report import VERDICTS, format_figure, target_text
from mllm_safety.evaluation.sets import EvalSet

log = logging.getLogger(__name__)


class SafetyEvalCallback(L.Callback):
    """Generates replies to the eval sets' prompts, judges them, and logs ASR, over-refusal and the refusal gap.

    Logged scalars (see ``mllm_safety.evaluation.metrics``): ``safety/asr/<set>`` and ``safety/asr/<set>/<category>``
    for harmful sets, ``safety/asr/mean`` over them, ``safety/over_refusal/<set>`` for benign sets,
    ``safety/refusal_gap/<benign set>`` where a benign set has a harmful twin, ``safety/partial/<set>`` for sets
    judged by the paper's judge, ``safety/asr/<set>/paper_view`` beside ``safety/asr/<set>`` for sets whose protocol
    judges the paper's view of a reply too, and ``utility/<set>/<metric>`` for utility sets. Each rank generates for
    its own slice of the prompts; the verdicts are reduced across ranks with torchmetrics, so every rank holds the same
    figures. A set run under a protocol is judged by the protocol's judge and generated with its settings.
    The history of evaluations is saved in checkpoints: a resumed run keeps its baseline and its table.
    """

    def __init__(
        self,
        benchmarks: list[BenchmarkSpec] | None = None,
        judge: str = "xstest",
        generation: GenerationSettings | None = None,
        limit: int | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        baseline: bool = True,
        log_table: bool = True,
        table_rows: int = 8,
    ) -> None:
        """
        Args:
            benchmarks: Benchmarks to evaluate, each ``{name, path, images, modes, limit}``; default: the bundled
                demo set (``typographic``, ``text`` and ``benign``).
            judge: Keyword refusal judge of the sets without a protocol: ``paper``, ``xstest``, ``vlguard`` or
                ``gcg``.
            generation: How replies are generated (``max_new_tokens``, ``min_new_tokens``, ``batch_size``,
                ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``); the same defaults as
                ``mllm_safety.evaluate``, which takes these settings from the fit config.
            limit: Use at most ``limit`` prompts of each set (quick checks); a benchmark's own ``limit`` wins.
            every_n_epochs: Evaluate after every n-th training epoch (``null``: not at epoch ends).
            every_n_steps: Also evaluate after every n-th optimizer step (LLaVA-style runs are a single epoch).
            baseline: Also evaluate before the first training step.
            log_table: Log a W&B table of image, prompt, reply and verdict (with a W&B logger).
            table_rows: Rows of each set in that table (its first prompts).
        """
        self.benchmarks = list(benchmarks) if benchmarks is not None else [BenchmarkSpec("demo")]
        if judge not in KEYWORD_JUDGES:
            raise ValueError(f"unknown judge {judge!r}; choose from {', '.join(KEYWORD_JUDGES)}")
        optional = [value for value in (limit, every_n_epochs, every_n_steps) if value is not None]
        if min(table_rows, *optional) < 1:
            raise ValueError("table_rows, limit, every_n_epochs and every_n_steps must be >= 1")
        self.judge = judge
        self.generation = generation or GenerationSettings()
        self.limit = limit
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self._last_step = -1
        self.baseline = baseline
        self.log_table = log_table
        self.table_rows = table_rows
        self.history: list[tuple[str, dict[str, float]]] = []
        """(label, metrics) of every evaluation, in order: ``before`` then ``epoch N``."""
        self.sets: list[EvalSet] = []
        self._table_indices: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.sets = load_sets(self.benchmarks, self.limit)
        check_image_slots(pl_module.model, self.sets)  # a probe this model cannot run stops the fit before it trains
        offsets = [sum(len(s.prompts) for s in self.sets[:i]) for i in range(len(self.sets))]
        self._table_indices = {
            offset + i
            for offset, s in zip(offsets, self.sets)
            for i in range(min(self.table_rows, len(s.prompts)) if self.log_table else 0)
        }

    def state_dict(self) -> dict[str, Any]:
        """The evaluations so far and the schedule's position, so a resumed run keeps its baseline and table."""
        return {"history": [[label, metrics] for label, metrics in self.history], "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(label, dict(metrics)) for label, metrics in state_dict["history"]]
        self._last_step = int(state_dict["last_step"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            if self.baseline:
                self.evaluate(trainer, pl_module, "before")
            return
        # Resumed: the baseline is in the restored history (evaluating now would judge trained weights as "before").
        if self.baseline and not any(label == "before" for label, _ in self.history):
            log.warning("safety evaluation: the checkpoint holds no baseline; the table will lack 'before'")
        for label in self._missed(trainer):
            self.evaluate(trainer, pl_module, label)

    def _missed(self, trainer: L.Trainer) -> list[str]:
        """Evaluations due at the restored position but not in the history: a checkpoint written after the last batch
        of an epoch (Lightning then counts the epoch as finished without its end hooks), or one written at an
        evaluation step before this callback's turn (a requeue)."""
        done = {label for label, _ in self.history}
        due = []
        epoch = trainer.current_epoch - 1
        if self.every_n_epochs and epoch >= 0 and (epoch + 1) % self.every_n_epochs == 0:
            due.append(f"epoch {epoch}")
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            due.append(f"step {step}")
        return [label for label in due if label not in done]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same optimizer step: evaluate once.
        if self.every_n_steps and step % self.every_n_steps == 0 and step not in (0, self._last_step):
            self._last_step = step
            self.evaluate(trainer, pl_module, f"step {step}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            print(self.summary())

    def summary(self) -> str:
        """A plain-text table of the headline figures (no per-category ones): one row each, one column per
        evaluation."""
        labels = [label for label, _ in self.history]
        names = [name for name in self.history[-1][1] if name.count("/") == 2]
        width = max(len(n) for n in names) + 2
        lines = ["evaluation".ljust(width) + "".join(label.rjust(10) for label in labels)]
        for name in names:
            values = [metrics.get(name) for _, metrics in self.history]
            lines.append(name.ljust(width) + "".join(format_figure(name, v).rjust(10) for v in values))
        return "\n".join(lines)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            generations = generate_for_rank(
                pl_module, self.sets, trainer.global_rank, trainer.world_size, self.generation
            )
        if was_training:
            pl_module.train()
        judges = set_judges(self.sets, self.judge)
        result = judge_and_reduce(
            self.sets, generations, [KeywordJudge(j) for j in dict.fromkeys(judges)], pl_module.device
        )
        codes = mixed_codes(self.sets, result.codes, judges)
        partial = [s.name for s, j in zip(self.sets, judges) if KeywordJudge(j).partial]
        metrics = {f"safety/{name}": value for name, value in summarize(self.sets, codes, "refusal", partial).items()}
        metrics |= {f"safety/{name}": value for name, value in result.views.items()}
        if any(s.is_utility for s in self.sets):
            utility = score_utility(self.sets, gather_generations(generations))  # every rank gathers (a collective)
            metrics |= {f"utility/{s}/{metric}": v for s, figures in utility.items() for metric, v in figures.items()}
        skipped = sum(c["skipped"] for c in result.counts.values())
        if skipped:
            log.warning("evaluation %s: %d prompt(s) skipped (images that failed to open)", label, skipped)

        self.history.append((label, metrics))
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        rows = gather_generations([g for g in generations if g.index in self._table_indices]) if wandb_loggers else []
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            if rows:
                self._log_table(wandb_loggers, trainer.global_step, rows, codes)
            headline = {k: round(v, 4) for k, v in metrics.items() if k.count("/") == 2}
            log.info("evaluation %s: %s", label, headline)
        return metrics

    def _log_table(self, loggers: list[WandbLogger], step: int, rows: list[Generation], codes: list[int]) -> None:
        import wandb

        data = []
        for row in rows:
            prompt = row.prompt
            image = None
            if prompt.image is not None and row.reply is not None and not isinstance(prompt.image, WordsInImageSlot):
                image = _thumbnail(prompt.image.load())
            verdict = VERDICTS["refusal"][codes[row.index]]
            data.append(
                [
                    prompt.set_name,
                    prompt.category,
                    wandb.Image(image) if image is not None else None,
                    prompt.question,
                    row.reply if row.reply is not None else row.error,
                    verdict,
                    target_text(prompt.target),
                ]
            )
        for logger in loggers:
            logger.log_table(
                "safety/generations",
                columns=["set", "category", "image", "prompt", "reply", "verdict", "target"],
                data=data,
                step=step,
            )


def _thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    image.thumbnail((size, size))
    return image
