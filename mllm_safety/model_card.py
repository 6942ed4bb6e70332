"""The model card ``export`` writes beside the model (``README.md``): what the Hub reads from its front matter, the
recipe as the run's config has it, and the figures of the checkpoint's evaluation with the judge, protocol and
generation settings that produced them.

The figures come from the ``report.json`` that ``python -m mllm_safety.evaluate`` wrote for the exported checkpoint
(``export --evaluation DIR``): it is the one record holding, per set, the protocol and generation settings beside
every judge's figures. The training run's own evaluations (``SafetyEvalCallback``) keep figures only, so a card never
takes its figures from them; without a report it says that no figure is known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, metadata_load, try_to_load_from_cache

from mllm_safety.evaluation.report import format_figure

KNOWN_LICENSES = {
    "llava-hf/llava-1.5-7b-hf": "llama2",
    "llava-hf/llava-1.5-13b-hf": "llama2",
    "liuhaotian/llava-v1.5-7b": "llama2",
    "liuhaotian/llava-v1.5-13b": "llama2",
}
"""Licenses of base checkpoints whose own card may not be at hand (LLaVA-1.5: its LLM's, Llama 2's)."""
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
SAFETY_FIGURES = ("asr", "over_refusal", "partial", "refusal_gap")
"""The per-set safety figures of a report, in the order a card lists them."""


def hub_id(source: str | None) -> str | None:
    """``source`` when it names a Hub repository rather than a local folder."""
    return source if source and _HUB_ID.fullmatch(source) and not Path(source).exists() else None


def base_license(source: str) -> str | None:
    """The base checkpoint's license: from its own card's front matter (the local folder's ``README.md``, or the
    Hub card in the local cache; nothing is downloaded), else :data:`KNOWN_LICENSES`, else unknown."""
    readme: Any = Path(source) / "README.md"
    if not Path(source).is_dir() and hub_id(source):
        readme = try_to_load_from_cache(source, "README.md")
    if isinstance(readme, str | Path) and Path(readme).is_file():
        license_name = (metadata_load(readme) or {}).get("license")
        if license_name:
            return str(license_name)
    return KNOWN_LICENSES.get(source)


def read_evaluation(folder: str, checkpoint: str) -> dict[str, Any]:
    """The ``report.json`` in ``folder``, checked to be an evaluation report of ``checkpoint`` (the card must not
    show another model's figures)."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"--evaluation {folder}: no report.json (the output folder of mllm_safety.evaluate)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"--evaluation {folder}: report.json is not JSON ({error})") from error
    if not isinstance(report, dict) or not {"sets", "judges", "checkpoint"} <= report.keys():
        raise ValueError(f"--evaluation {folder}: report.json is not a report of mllm_safety.evaluate")
    evaluated = report["checkpoint"]
    if evaluated is None or Path(evaluated).resolve() != Path(checkpoint).resolve():
        raise ValueError(
            f"--evaluation {folder}: its report evaluated checkpoint {evaluated}, not the exported {checkpoint}; "
            "evaluate this checkpoint (python -m mllm_safety.evaluate ... --ckpt_path CKPT --output DIR) first"
        )
    return report


def generation_text(settings: dict[str, Any] | None) -> str:
    """Generation settings in a few words."""
    if not settings:
        return "not recorded"
    tokens = f"at most {settings['max_new_tokens']} new tokens"
    if not settings.get("do_sample"):
        return f"greedy, {tokens}"
    sampling = ", ".join(f"{key} {settings.get(key)}" for key in ("temperature", "top_k", "top_p", "seed"))
    return f"sampled ({sampling}), {tokens}"


def figure_rows(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Markdown table rows of the report's safety figures (per set, figure and judge: a protocol's set by its
    protocol's judge only) and utility figures (per set and metric)."""
    safety, utility = [], []
    for name, entry in report["sets"].items():
        protocol = entry.get("protocol") or {}
        generation = generation_text(entry.get("generation") or report.get("generation"))
        where = f"{protocol.get('name', 'none')} | {generation}"
        if entry.get("utility"):
            for metric, value in (report.get("utility") or {}).get(name, {}).items():
                figure = format_figure(f"utility/{name}/{metric}", value)
                utility.append(f"| {name} | {metric} | {figure} | {entry['benchmark']} scorer | {where} |")
            continue
        judges = [protocol["judge"]] if protocol else list(report["judges"])
        for figure in SAFETY_FIGURES:
            for judge in judges:
                value = report["judges"].get(judge, {}).get("figures", {}).get(f"{figure}/{name}")
                if value is not None:
                    shown = f"{value:+.3f}" if figure == "refusal_gap" else format_figure(f"{figure}/{name}", value)
                    safety.append(f"| {name} | {figure} | {shown} | {judge} | {where} |")
    return safety, utility


def recipe_lines(config: dict[str, Any]) -> list[str]:
    """The training recipe, read from the run's resolved config."""
    model, data, trainer = config["model"], config["data"], config["trainer"]
    rejection = data["rejection"]
    if data.get("world"):
        shards = "the laptop world's generated sets (`data.world`)"
    elif data.get("train_shards"):
        shards = f"`{data['train_shards']}`"
    else:
        shards = f"the project's generated demo set ({data['demo_samples']} samples)"
    mixture = ", ".join(f"{n if n is not None else 'all'} of `{s}`" for s, n in (data.get("mixture") or {}).items())
    reply = {
        "fixed": f'always "{rejection["sentence"]}"',
        "pool": f"one of {len(rejection['pool'])} refusal sentences per sample",
        "reason": f'"{rejection["sentence"]}" and one of {len(rejection["reasons"])} short reasons per sample',
    }[rejection["reply"]]
    lora = model.get("lora")
    lora_text = (
        f"r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}, target modules {lora['target_modules']}"
        if lora
        else "none"
    )
    trainable = ", ".join(part for part, on in (model.get("trainable") or {}).items() if on) or "none"
    max_steps = trainer.get("max_steps")
    steps = f", at most {max_steps} steps" if max_steps not in (None, -1) else ""
    optim = ", ".join(f"{key} {value}" for key, value in (model.get("optim") or {}).items())
    scale = (
        f"batch {data['batch_size']} per device, devices {trainer.get('devices')}, nodes {trainer.get('num_nodes')}, "
        f"gradient accumulation {trainer.get('accumulate_grad_batches')}"
    )
    return [
        f"- **Data**: {shards}; mixture: {mixture or 'every sample'}.",
        f"- **Rejection swap**: ratio {data['rejection_ratio']} of the eligible samples "
        f"({', '.join(rejection.get('sources') or []) or 'every source'}); reply {reply}; one turn kept: "
        f"{rejection['keep_one_turn']}; end of turn learned: {rejection['learn_eos']}; image: {rejection['image']}.",
        f"- **LoRA**: {lora_text}; trained parts: {trainable}.",
        f"- **Optimisation**: {optim}; {trainer.get('max_epochs')} epoch(s){steps}; {scale}; precision "
        f"{trainer.get('precision')}.",
        f"- **Seeds**: `seed_everything` {config.get('seed_everything')}, data {data['seed']}, "
        f"swap {rejection['seed']}.",
    ]


def assembled_parts(model: dict[str, Any]) -> str | None:
    """The parts of an assembled model (``model.llm`` + ``model.vision`` + projector) in words, or ``None``."""
    llm, vision = model.get("llm") or {}, model.get("vision") or {}
    if not llm or not vision:
        return None
    if vision.get("backend") == "hf":
        tower = f"`{vision.get('path')}`"
    else:
        weights = f"`{vision['pretrained']}` weights" if vision.get("pretrained") else "random weights"
        tower = f"open_clip `{vision.get('name')}` ({weights})"
    random_llm = " (random weights)" if llm.get("random_init") else ""
    projector = model.get("projector") or "mlp2x_gelu"
    return f"the LLM `{llm.get('name')}`{random_llm}, the vision tower {tower} and a new {projector} projector"


def model_card(
    config: dict[str, Any],
    checkpoint: str,
    report: dict[str, Any] | None,
    evaluation: str | None,
    base_model: str | None = None,
    model_type: str | None = None,
) -> ModelCard:
    """The card of an export of ``checkpoint`` from a run of ``config`` (its resolved fit config as a dict), with the
    figures of ``report`` (read from the folder ``evaluation``), or none. ``base_model``: the Hub id of the base
    checkpoint (default: the configured source, when it is one); ``model_type``: the exported ``config.json``'s."""
    model = config["model"]
    source = model.get("pretrained") or (model.get("llava") or {}).get("path")
    parts = assembled_parts(model) if source is None else None
    if source is None and parts is None:
        raise ValueError("a model card needs the base checkpoint: the config has neither model.pretrained nor llava")
    source = source or model["llm"]["name"]  # an assembled model's base: its LLM
    base_model = base_model or hub_id(source)
    license_name = base_license(source) or (KNOWN_LICENSES.get(base_model) if base_model else None)
    tags = ["mllm-safety", "safety", *([model_type] if model_type else []), *(["lora"] if model.get("lora") else [])]
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license_name,
        tags=list(dict.fromkeys(tags)),
    )
    if parts is not None:
        started = "an assembled model: " + parts + (f" (base model `{base_model}`)" if base_model else "")
    elif base_model is None:
        started = f"the local folder `{source}`"
    else:
        started = f"`{base_model}`" + (f" (local folder `{source}`)" if source != base_model else "")
    lines = [
        "# Safety-aligned " + (base_model or Path(source).name),
        "",
        f"Finetuned from {started} with mllm-safety's rejection swap: a share of benign training samples get their "
        "reply replaced by a refusal (Wang et al., CVPR 2025). Exported from checkpoint "
        f"`{checkpoint}`{', LoRA folded into the weights' if model.get('lora') else ''}.",
        "",
        f"License: {license_name}." if license_name else "License: that of the base model (not recorded here).",
        "",
        "## Recipe",
        "",
        "From the run's resolved config:",
        "",
        *recipe_lines(config),
        "",
        "## Evaluation",
        "",
    ]
    if report is None:
        lines.append(
            "This export was given no evaluation report: no safety or utility figure of this model is known here. "
            "`python -m mllm_safety.evaluate --config RUN_CONFIG --ckpt_path CKPT --output DIR` evaluates it; "
            "exporting again with `--evaluation DIR` puts its figures here."
        )
    else:
        safety, utility = figure_rows(report)
        rescored = " (judged again from its saved replies)" if report.get("rescored") else ""
        header = "| --- | --- | ---: | --- | --- | --- |"
        lines += [
            f"From `report.json` of `mllm_safety.evaluate` in `{evaluation}`{rescored}, on checkpoint "
            f"`{report['checkpoint']}`. ASR: share of harmful requests answered; over-refusal: share of benign "
            "requests refused; refusal gap: refusal rate on harmful requests minus on their benign twins.",
            "",
            "| set | figure | value | judge | protocol | generation |",
            header,
            *safety,
        ]
        if utility:
            lines += ["", "| set | metric | value | scored by | protocol | generation |", header, *utility]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
