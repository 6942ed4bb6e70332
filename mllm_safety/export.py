"""``python -m mllm_safety.export --config RUN_CONFIG --ckpt_path CKPT --output DIR``: the trained model as a folder
that transformers (and so vLLM) load.

The run's fit config rebuilds its model (as ``evaluate`` does: the checkpoint it started from, its LoRA settings and
chat template), the checkpoint puts the trained weights back (a Lightning checkpoint, the folder an FSDP2 run saves,
``trainable.safetensors``, or ``last``: the newest of the run), LoRA is folded in, and the folder is written with the
chat template the model was trained with: a llava-hf folder (``LlavaForConditionalGeneration``) for a run of
``model.llava``, the checkpoint's own layout (``AutoModelForImageTextToText`` / ``AutoProcessor``) for a run of
``model.pretrained``. An assembled model (``model.llm`` + ``model.vision`` + an ``mlp2x_gelu`` projector, e.g. the
demo) is written as a llava-hf folder too: its open_clip ViT becomes the ``CLIPVisionModel`` it is and the tokenizer
gets an ``<image>`` token (:mod:`mllm_safety.model.assembled_export`).
The folder gets a model card (``README.md``, :mod:`mllm_safety.model_card`): the Hub's front matter, the recipe from
the run's config, and the figures of ``--evaluation DIR`` (what ``mllm_safety.evaluate`` wrote for this checkpoint).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import LightningArgumentParser

from mllm_safety.cli import RunCLI
from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.model.assembled_export import prepare_assembled_for_llava_hf
from mllm_safety.model.hub_vlm import HubVLM, read_hub_config, save_hub_vlm
from mllm_safety.model.llava_hf import save_llava_hf
from mllm_safety.model_card import model_card, read_evaluation
from mllm_safety.train.checkpoints import load_checkpoint_weights
from mllm_safety.train.module import SafetyAlignModule

log = logging.getLogger(__name__)

ExportDtype = Literal["auto", "float16", "bfloat16", "float32"]


class ExportCLI(RunCLI):
    """``export``: the fit config, ``--ckpt_path``, ``--output`` and ``--dtype``; builds the model only."""

    ckpt_path_help = (
        "Trained weights of the run: a Lightning checkpoint file, the folder an FSDP2 run saves, "
        "trainable.safetensors, or 'last' (the newest checkpoint in the run's folder)."
    )

    def add_entry_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output", type=str | None, default=None, help="Folder the exported model is written to.")
        parser.add_argument(
            "--dtype",
            type=ExportDtype,
            default="auto",
            help="Weight dtype of the export; auto: the dtype of the checkpoint training started from.",
        )
        parser.add_argument(
            "--evaluation",
            type=str | None,
            default=None,
            help="The folder mllm_safety.evaluate wrote for this checkpoint: the model card (README.md) gives the "
            "figures of its report.json with their judges, protocols and generation settings; none: the card says "
            "the export was not evaluated.",
        )
        parser.add_argument(
            "--base_model",
            type=str | None,
            default=None,
            help="Hub id of the checkpoint the run started from, for the model card's base_model; default: "
            "model.pretrained or model.llava.path when that is a Hub id (a local folder has none).",
        )

    def before_instantiate_classes(self) -> None:
        """Stop on a command that cannot export before the model is built (minutes for a 7B model)."""
        if self.config.output is None:
            self.parser.error("--output is required: the folder the exported model is written to")
        model = self.config.model
        assembled = model.pretrained is None and model.llava is None
        if assembled and (model.projector or "mlp2x_gelu") != "mlp2x_gelu":
            self.parser.error(
                f"an assembled model exports as a llava-hf folder, whose projector is mlp2x_gelu; this run's is "
                f"{model.projector!r}"
            )
        self.ckpt_path = self.resolve_ckpt_path(self.checkpoint_folders(), required=True)
        evaluation = self.config.evaluation
        self.report = read_evaluation(evaluation, self.ckpt_path) if evaluation is not None else None
        self.dtype = export_dtype(self.config)
        if not assembled:
            # The base weights load straight in the export's dtype (exact for the default, the checkpoint's own), so
            # no float32 copy of the model is held; LoRA is folded in weight by weight (model/export_weights.py).
            # An assembled model keeps the run's: its randomly initialised parts are checked by fingerprint.
            self.config.model.frozen_dtype = str(self.dtype).removeprefix("torch.")

    def instantiate_classes(self) -> None:
        self.build_model()


def export_dtype(config) -> torch.dtype:
    """``--dtype``, or for ``auto`` the dtype the checkpoint training started from is stored in (an assembled model:
    the run's ``model.frozen_dtype``)."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    model = config.model
    if model.pretrained is None and model.llava is None:
        return getattr(torch, model.frozen_dtype)
    return checkpoint_dtype(model.pretrained or model.llava.path, model.hub.trust_remote_code)


def checkpoint_dtype(path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a transformers checkpoint is stored in, from its config (float32 when it does not say)."""
    config = read_hub_config(path, trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def export_module(module: SafetyAlignModule, output: str, dtype: torch.dtype) -> None:
    """Write ``module``'s model, LoRA folded in and cast to ``dtype`` (both in place), as a transformers folder in
    ``output``: the checkpoint's own layout for a hub VLM, a llava-hf folder for a llava-hf import.

    The folder's ``generation_config`` ends a reply where evaluation did: at the template's end-of-turn marker too
    (``###`` for ``yi_vl``, ``<|eot_id|>``), which the checkpoint's own config may lack, so a served export stops."""
    module.model.generation_config.eos_token_id = list(module.processor.stop_token_ids)
    if isinstance(module.model, HubVLM):
        save_hub_vlm(module.model, module.processor.hf_processor, output, dtype)
    else:
        if module.model.image_token_id == IMAGE_TOKEN_ID:  # assembled: LLaVA's out-of-vocabulary image id
            prepare_assembled_for_llava_hf(module.model, module.processor.tokenizer)
        save_llava_hf(module.model, output, module.processor.tokenizer, dtype)


def main(args: list[str] | None = None) -> SafetyAlignModule:
    """Export a run; returns the module that was written (trained weights loaded, LoRA folded in)."""
    cli = ExportCLI(args)
    loaded = load_checkpoint_weights(cli.model, cli.ckpt_path)
    log.info("loaded %d trained tensors from %s", len(loaded), cli.ckpt_path)
    export_module(cli.model, cli.config.output, cli.dtype)
    model_type = json.loads((Path(cli.config.output) / "config.json").read_text(encoding="utf-8")).get("model_type")
    card = model_card(
        cli.config.as_dict(), cli.ckpt_path, cli.report, cli.config.evaluation, cli.config.base_model, model_type
    )
    card.save(Path(cli.config.output) / "README.md")
    log.info("wrote %s", cli.config.output)
    return cli.model


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
