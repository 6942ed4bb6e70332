"""The standalone evaluation's outputs: ``report.json`` (every figure), ``generations.jsonl`` and ``summary.md``;
and reading ``generations.jsonl`` back, so a report can be recomputed with other judges without a model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mllm_safety.evaluation.files import set_name
from mllm_safety.evaluation.generation import Generation
from mllm_safety.evaluation.judge import PARTIAL
from mllm_safety.evaluation.metrics import NOT_JUDGED, SKIPPED, UNKNOWN, EvaluationResult
from mllm_safety.evaluation.sets import EvalSet, all_prompts

_UNJUDGED = {UNKNOWN: "unknown", SKIPPED: "skipped", NOT_JUDGED: "not judged"}
VERDICTS = {
    "refusal": {1: "refused", 0: "answered", PARTIAL: "partial", **_UNJUDGED},
    "harm": {1: "unsafe", 0: "safe", **_UNJUDGED},
}
"""What a judge's verdict code means, by what the judge measures."""
GENERATIONS_FILE = "generations.jsonl"


def format_figure(name: str, value: float | None) -> str:
    """A figure as a table shows it: a share as a percentage, a score (MME's) as a number."""
    if value is None:
        return ""
    return f"{value:.1f}" if "score" in name.split("/")[2:] or "/score/" in name else f"{100 * value:.1f}%"


def _jsonable(target: Any) -> Any:
    return dataclasses.asdict(target) if dataclasses.is_dataclass(target) else target


def target_text(target: Any) -> str:
    """A utility prompt's reference answer in a few words (empty for safety prompts)."""
    if target is None:
        return ""
    value = _jsonable(target)
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def write_report(
    output: str | Path,
    sets: list[EvalSet],
    result: EvaluationResult,
    generations: list[Generation],
    measures: dict[str, str],
    meta: dict[str, Any],
    utility: dict[str, dict[str, float]] | None = None,
    set_generation: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write the three files into ``output`` (created if needed); ``measures`` maps judge name -> what it measures
    (``refusal`` or ``harm``), ``meta`` is recorded as is (model config, checkpoint, settings), ``utility`` maps
    utility set -> metric -> value, ``set_generation`` set -> the generation settings its replies were made with."""
    utility = utility or {}
    set_generation = set_generation or {}
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    skipped = [{"set": g.prompt.set_name, "id": g.prompt.id, "error": g.error} for g in generations if g.reply is None]
    report = {
        **meta,
        "sets": {
            s.name: {
                "benchmark": s.benchmark,
                "harmful": s.harmful,
                "utility": s.is_utility,
                "contrast": s.contrast,
                "source": s.source,
                "protocol": s.protocol.as_dict() if s.protocol is not None else None,
                "generation": set_generation.get(s.name),
                **result.counts[s.name],
            }
            for s in sets
        },
        "judges": {name: {"measures": measures[name], "figures": figures} for name, figures in result.metrics.items()},
        "utility": utility,
        "skipped": skipped,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(folder / GENERATIONS_FILE, "w", encoding="utf-8") as handle:
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
                "target": _jsonable(prompt.target),
                "reply": g.reply,
                "error": g.error,
                "verdicts": {name: VERDICTS[measures[name]][codes[g.index]] for name, codes in result.codes.items()},
            }
            if g.paper_view is not None:
                record["paper_view"] = g.paper_view
                record["paper_view_verdict"] = VERDICTS["refusal"][result.view_codes[g.index]]
            handle.write(json.dumps(record) + "\n")
    (folder / "summary.md").write_text(
        summary_markdown(sets, result, measures, meta, len(skipped), utility), encoding="utf-8"
    )
    return folder


def read_generations(folder: str | Path, sets: list[EvalSet]) -> list[Generation]:
    """The replies of ``folder/generations.jsonl``, matched to the prompts of ``sets`` by (set, id): every prompt of
    the sets must have its line and every line its prompt, else an error names what does not match."""
    path = Path(folder) / GENERATIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"rescore: {path} does not exist (run mllm_safety.evaluate with --output there first)")
    prompts = all_prompts(sets)
    index = {(p.set_name, p.id): i for i, p in enumerate(prompts)}
    names = {s.name for s in sets}
    generations: dict[int, Generation] = {}
    unknown_sets: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            key, reply, error = (record["set"], record["id"]), record["reply"], record.get("error")
            view = record.get("paper_view")
        except (json.JSONDecodeError, KeyError, TypeError) as failure:
            raise ValueError(f"{path}: line {number} is not a generation record ({failure})") from failure
        if key[0] not in names:
            unknown_sets.add(key[0])
            continue
        if key not in index:
            raise ValueError(
                f"{path}: line {number}: set {key[0]} has no prompt {key[1]!r} in the configured benchmark"
            )
        generations[index[key]] = Generation(index[key], prompts[index[key]], reply, error, view)
    if unknown_sets:
        raise ValueError(
            f"{path}: sets {', '.join(sorted(unknown_sets))} are not among the configured benchmarks' sets "
            f"({', '.join(s.name for s in sets)}); configure their benchmarks (--eval.benchmarks)"
        )
    missing = [s.name for s in sets if any(index[(s.name, p.id)] not in generations for p in s.prompts)]
    if missing:
        raise ValueError(
            f"{path}: no replies for (some) prompts of set(s) {', '.join(missing)}: evaluate them first, or "
            "configure the benchmarks (and limit) the replies were generated with"
        )
    return [generations[i] for i in sorted(generations)]


def summary_markdown(
    sets: list[EvalSet],
    result: EvaluationResult,
    measures: dict[str, str],
    meta: dict[str, Any],
    skipped: int,
    utility: dict[str, dict[str, float]] | None = None,
) -> str:
    """Headline figures per set and judge, the refusal gaps, utility, and the per-category ASR of the first judge."""
    judges = list(result.metrics)
    lines = ["# Evaluation", ""]
    if meta.get("checkpoint"):
        lines += [f"Checkpoint: `{meta['checkpoint']}`", ""]
    if meta.get("rescored"):
        lines += [f"Rescored from `{GENERATIONS_FILE}` (replies of an earlier run).", ""]
    lines += [
        "ASR: share of harmful requests answered (refusal judges) or answered unsafely (classifier); partial: the "
        "paper judge's short replies that neither refuse nor answer; over-refusal: share of benign requests refused. "
        "Legitimate-advice requests (legal, financial, health) are left out of ASR and shown as `advice`, unless a "
        "set's protocol counts them.",
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
        if any(f"partial/{s.name}" in figures for figures in result.metrics.values()):
            rows.append(("partial", f"partial/{s.name}", len(s.prompts) - advice))
        if f"{figure}/{s.name}/paper_view" in result.views:
            rows.append((f"{figure} (paper's view)", f"{figure}/{s.name}/paper_view", len(s.prompts) - advice))
        if advice:
            rows.append(("asr (advice)", f"asr/{s.name}/advice", advice))
        for label, key, prompts in rows:
            values = " | ".join(format_figure(key, result.metrics[j].get(key)) for j in judges)
            lines.append(f"| {s.name} | {label} | {prompts} | {values} |")
    means = " | ".join(format_figure("asr/mean", result.metrics[j].get("asr/mean")) for j in judges)
    lines.append(f"| **mean** | asr | | {means} |")
    lines += probe_table(sets, result)
    protocols = [s for s in sets if s.protocol is not None]
    if protocols:
        lines += ["", "Protocols (the set's figures comparable with the paper's are its protocol judge's column):", ""]
        lines += [
            f"- {s.name}: `{s.protocol.name}`, judge `{s.protocol.judge}`, generation {dict(s.protocol.generation)} "
            f"({s.protocol.source}){_paper_figure_note(s)}"
            for s in protocols
        ]
        if result.views:
            lines += [
                "",
                "`(paper's view)` rows judge each reply as the paper's scripts saw it (the decoded output ids, BOS and "
                "EOS kept, stripped and sliced `[4:-4]`); the whole-reply rows are the figures to trust.",
            ]
    gaps = sorted({k for figures in result.metrics.values() for k in figures if k.startswith("refusal_gap/")})
    if gaps:
        lines += ["", "Refusal gap (refusal rate on harmful requests minus on benign ones phrased like them):", ""]
        lines += [
            f"- {gap.split('/', 1)[1]}: "
            + ", ".join(f"{j} {result.metrics[j][gap]:+.3f}" for j in judges if gap in result.metrics[j])
            for gap in gaps
        ]
    if utility:
        lines += ["", "Utility (benign tasks with checkable answers):", "", "| set | metric | value |"]
        lines += ["| --- | --- | ---: |"]
        lines += [
            f"| {name} | {metric} | {format_figure(f'utility/{name}/{metric}', value)} |"
            for name, figures in utility.items()
            for metric, value in figures.items()
        ]
    first = judges[0]
    categories = [
        (k, v)
        for k, v in result.metrics[first].items()
        if k.count("/") == 2 and not k.endswith(("/advice", "/paper_view"))
    ]
    if categories:
        lines += ["", f"Per category ({first} judge):", "", "| figure | value |", "| --- | ---: |"]
        lines += [f"| {key} | {format_figure(key, value)} |" for key, value in categories]
    if skipped:
        lines += ["", f"{skipped} prompt(s) skipped (images that failed to open): see `report.json`."]
    return "\n".join(lines) + "\n"


PROBE_CHANNELS = {
    "text": "text",
    "img2text": "words in the image slot",
    "white": "white image, words after it",
    "matched_ocr": "words as pixels",
    "text2img": "words as pixels, no prompt",
    "typographic": "typographic image",
    "sd_typo": "SD+TYPO image",
}
"""The modes the probe table sets side by side (``<benchmark>_<mode>`` sets), and what carries the request in each."""


def probe_table(sets: list[EvalSet], result: EvaluationResult) -> list[str]:
    """For each benchmark with an ``img2text`` set: the request's ASR as text, as words in the image slot and as
    pixels side by side (and the benign twins' over-refusal where the sets have twins), so that "refused as words in
    the image slot, answered as pixels" reads in one row. Each row is its ``img2text`` set's judge: its protocol's,
    else the first judge."""
    names = {s.name for s in sets}
    twins = {s.contrast: s.name for s in sets if s.contrast is not None}
    first = next(iter(result.metrics))
    rows = []
    for probe in (s for s in sets if s.harmful and s.name.endswith("_img2text")):
        prefix = probe.name.removesuffix("_img2text")
        judge = probe.protocol.judge if probe.protocol is not None else first
        channels = {mode: f"{prefix}_{mode}" for mode in PROBE_CHANNELS if f"{prefix}_{mode}" in names}
        rows.append((prefix, judge, "asr", {mode: f"asr/{name}" for mode, name in channels.items()}))
        benign = {mode: f"over_refusal/{twins[name]}" for mode, name in channels.items() if name in twins}
        if benign:
            rows.append((prefix, judge, "over_refusal (benign twins)", benign))
    if not rows:
        return []
    columns = [mode for mode in PROBE_CHANNELS if any(mode in figures for *_, figures in rows)]
    lines = [
        "",
        "Words or pixels: the same request as text, as its word embeddings in the image slot (img2text) and as pixels:",
        "",
        "| benchmark | judge | figure | " + " | ".join(f"{m} ({PROBE_CHANNELS[m]})" for m in columns) + " |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for prefix, judge, label, figures in rows:
        values = [
            format_figure(figures[m], result.metrics[judge].get(figures[m])) if m in figures else "" for m in columns
        ]
        lines.append(f"| {prefix} | {judge} | {label} | " + " | ".join(values) + " |")
    return lines


def _paper_figure_note(eval_set: EvalSet) -> str:
    """Whether a protocol set's ASR is the paper's published figure or an extra one."""
    modes = eval_set.protocol.paper_figure_modes
    if not modes:
        return ""
    if any(eval_set.name == set_name(eval_set.benchmark, mode) for mode in modes):
        return ": **the paper's figure**"
    return ": an extra figure (the paper's judge script does not read this mode)"
