"""Multi-GPU training with FSDP2: per-parameter sharding through Lightning's ``ModelParallelStrategy``.

``trainer.strategy: fsdp2`` shards the model over every rank (data parallel only, no tensor parallelism). The units,
each all-gathered in one collective right before it runs and freed after:

- every decoder layer of the LLM (its LoRA adapters included: FSDP2 shards per parameter, so the frozen base and the
  trainable adapters of a layer share one all-gather, and only the adapters' gradients are reduce-scattered);
- the vision tower (frozen by default: all-gathered for its forward, no gradient traffic, no optimizer state);
- the projector (trainable);
- the root: token embeddings, final norm and LM head (tied weights stay together).

``bf16-mixed`` keeps fp32 shards (the optimizer's master weights), all-gathers and computes in bf16 and reduces
gradients in fp32; ``bf16-true`` stores everything in bf16. ``ddp`` remains available for models that fit one GPU.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mllm_safety.model.hub_vlm import HubVLM
from mllm_safety.model.mllm import MultimodalLM, is_sharded
from mllm_safety.model.trainable import check_weight_names, trainable_state_dict
from mllm_safety.train.lightning_compat import SHARDED_METADATA_FILE, is_sharded_checkpoint, shard_over_every_rank


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all ranks of all nodes, with checkpoints of the trainable weights.

    The LightningModule shards itself in ``configure_model`` with :func:`shard_multimodal_lm`, reading
    :attr:`reshard_after_forward` and :meth:`mixed_precision` from here.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            reshard_after_forward: Free each layer's gathered weights after its forward and gather them again for
                the backward (less memory); ``false`` keeps them until the backward (less communication).
            save_distributed_checkpoint: Each rank writes its own shard (a checkpoint folder); ``false`` gathers the
                trainable weights on rank 0 into one file.
            process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs unless set.
            timeout: How long a collective may wait for the other ranks.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.sharded_checkpoints = save_distributed_checkpoint

    def setup_environment(self) -> None:
        shard_over_every_rank(self)
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable weights only: each rank's shards for a sharded checkpoint, else gathered to rank 0. Frozen
        weights are never gathered or copied (Lightning's own would gather all of a 7B model to keep ~5% of it)."""
        return trainable_state_dict(self.lightning_module, full=not self.sharded_checkpoints)

    def mixed_precision(self) -> MixedPrecisionPolicy:
        """FSDP's own mixed precision for ``bf16-mixed``: bf16 all-gathers and compute, fp32 shards and reduction."""
        if self.precision_plugin.precision == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a sharded checkpoint that holds only some weights (the trainable ones); files go to Lightning.

        Lightning's own loader fails on the frozen weights missing from such a checkpoint even with
        ``strict_loading=False`` (Lightning-AI/pytorch-lightning#20274); here the trainable ones are checked with the
        project's one rule (``check_weight_names``) and loaded alone.
        """
        path = Path(self.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed import checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = {
            key.removeprefix("state_dict.")
            for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
            if key.startswith("state_dict.")
        }
        check_weight_names(f"checkpoint {path}", saved, self.lightning_module)
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if k in saved}
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optimizer_state[key])
        return torch.load(path / SHARDED_METADATA_FILE, weights_only=True)


StrategyRegistry.register(
    "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over all ranks, through ModelParallelStrategy"
)


def block_units(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks inside ``module``: the classes its Hugging Face models mark as never to be split
    (``_no_split_modules`` of every ``PreTrainedModel`` in it, so a peft wrapper or a VLM's sub-models count)."""
    classes = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in module.modules() if type(m).__name__ in classes]


def decoder_layers(llm_parts: list[nn.Module]) -> list[nn.Module]:
    """The transformer blocks (see :func:`block_units`) of the language model's parts (its body, and parts without
    blocks such as a separate LM head); an error when there are none."""
    layers = [layer for part in llm_parts for layer in block_units(part)]
    if not layers:
        names = [type(part).__name__ for part in llm_parts]
        classes = sorted(
            {n for p in llm_parts for m in p.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
        )
        raise ValueError(f"cannot find the decoder layers of the language model {names}: _no_split_modules={classes}")
    return layers


def shard_multimodal_lm(
    model: MultimodalLM | HubVLM,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """Applies FSDP2 to ``model`` in place, bottom-up: LLM decoder layers and vision blocks, projector, vision tower,
    then the root. Works on every model family through ``model.part_modules()``.

    All computation must enter through the root, so that its hooks gather the embeddings and LM head first:
    ``forward`` does, and ``generate`` is registered as a second forward method (it embeds the prompt and runs the
    LLM's own ``generate`` inside). Every rank must call ``generate`` equally often (``SafetyEvalCallback`` does);
    ranks whose replies end at different lengths keep stepping together because ``fully_shard`` marks every
    submodule as FSDP-managed, which makes transformers' ``generate`` run with ``synced_gpus``. A no-op on a model
    that is already sharded (``configure_model`` may run again).
    """
    if is_sharded(model):
        return
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    parts = model.part_modules()
    layers = decoder_layers(parts["llm"])
    vision_blocks = [block for module in parts["vision"] for block in block_units(module)]
    for unit in [*layers, *vision_blocks, *parts["projector"], *parts["vision"]]:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    register_fsdp_forward_method(model, "generate")
