"""The standalone evaluation's outputs: ``report.json`` (every figure), ``generations.jsonl`` and ``summary.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm_safety.evaluation.generation import Generation
from mllm_safety.evaluation.metrics import SKIPPED, UNKNOWN, EvaluationResult
from mllm_safety.evaluation.sets import EvalSet

_VERDICTS = {
    "refusal": {1: "refused", 0: "answered", UNKNOWN: "unknown", SKIPPED: "skipped"},
    "harm": {1: "unsafe", 0: "safe", UNKNOWN: "unknown", SKIPPED: "skipped"},
}


def write_report(
    output: str | Path,
    sets: list[EvalSet],
    result: EvaluationResult,
    generations: list[Generation],
    measures: dict[str, str],
    meta: dict[str, Any],
    utility: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Write the three files into ``output`` (created if needed); ``measures`` maps judge name -> what it measures
    (``refusal`` or ``harm``), ``meta`` is recorded as is (model config, checkpoint, settings), ``utility`` maps
    utility set -> metric -> value."""
    utility = utility or {}
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    skipped = [{"set": g.prompt.set_name, "id": g.prompt.id, "error": g.error} for g in generations if g.reply is None]
    report = {
        **meta,
        "sets": {
            s.name: {
                "benchmark": s.benchmark,
                "harmful": s.harmful,
                "contrast": s.contrast,
                "source": s.source,
                **result.counts[s.name],
            }
            for s in sets
        },
        "judges": {name: {"measures": measures[name], "figures": figures} for name, figures in result.metrics.items()},
        "utility": utility,
        "skipped": skipped,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(folder / "generations.jsonl", "w", encoding="utf-8") as handle:
        for g in generations:
            prompt = g.prompt
            record = {
                "set": prompt.set_name,
                "id": prompt.id,
                "category": prompt.category,
                "advice": prompt.advice,
                "question": prompt.question,
                "request": prompt.request,
                "image": prompt.image.describe() if prompt.image is not None else None,
                "reply": g.reply,
                "error": g.error,
                "verdicts": {name: _VERDICTS[measures[name]][codes[g.index]] for name, codes in result.codes.items()},
            }
            handle.write(json.dumps(record) + "\n")
    (folder / "summary.md").write_text(
        summary_markdown(sets, result, measures, meta, len(skipped), utility), encoding="utf-8"
    )
    return folder


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def summary_markdown(
    sets: list[EvalSet],
    result: EvaluationResult,
    measures: dict[str, str],
    meta: dict[str, Any],
    skipped: int,
    utility: dict[str, dict[str, float]] | None = None,
) -> str:
    """Headline figures per set and judge, the refusal gaps, and the per-category ASR of the first judge."""
    judges = list(result.metrics)
    lines = ["# Safety evaluation", ""]
    if meta.get("checkpoint"):
        lines += [f"Checkpoint: `{meta['checkpoint']}`", ""]
    lines += [
        "ASR: share of harmful requests answered (refusal judges) or answered unsafely (classifier); over-refusal: "
        "share of benign requests refused. Legitimate-advice requests (legal, financial, health) are left out of "
        "ASR and shown as `advice`.",
        "",
        "| set | figure | prompts | " + " | ".join(judges) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in judges) + " |",
    ]
    for s in sets:
        if s.is_utility:
            continue
        figure = "asr" if s.harmful else "over_refusal"
        advice = sum(p.advice for p in s.prompts)
        rows = [(figure, f"{figure}/{s.name}", len(s.prompts) - advice)]
        if advice:
            rows.append(("asr (advice)", f"asr/{s.name}/advice", advice))
        for label, key, prompts in rows:
            values = " | ".join(_pct(result.metrics[j].get(key)) for j in judges)
            lines.append(f"| {s.name} | {label} | {prompts} | {values} |")
    lines.append(f"| **mean** | asr | | {' | '.join(_pct(result.metrics[j].get('asr/mean')) for j in judges)} |")
    gaps = sorted({k for figures in result.metrics.values() for k in figures if k.startswith("refusal_gap/")})
    if gaps:
        lines += ["", "Refusal gap (refusal rate on harmful requests minus on benign ones phrased like them):", ""]
        lines += [
            f"- {gap.split('/', 1)[1]}: "
            + ", ".join(f"{j} {result.metrics[j][gap]:+.3f}" for j in judges if gap in result.metrics[j])
            for gap in gaps
        ]
    if utility:
        lines += [
            "",
            "Utility (benign tasks with checkable answers):",
            "",
            "| set | metric | value |",
            "| --- | --- | ---: |",
        ]
        lines += [
            f"| {name} | {metric} | {value:.4f} |"
            for name, figures in utility.items()
            for metric, value in figures.items()
        ]
    first = judges[0]
    categories = [(k, v) for k, v in result.metrics[first].items() if k.count("/") == 2 and not k.endswith("/advice")]
    if categories:
        lines += ["", f"Per category ({first} judge):", "", "| figure | value |", "| --- | ---: |"]
        lines += [f"| {key} | {_pct(value)} |" for key, value in categories]
    if skipped:
        lines += ["", f"{skipped} prompt(s) skipped (images that failed to open): see `report.json`."]
    return "\n".join(lines) + "\n"
