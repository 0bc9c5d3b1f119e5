"""FSDP2 sharding for the Trainer (``shard: fsdp2``): the trained student and the frozen teacher split over the
processes, so a teacher that does not fit one device (FLUX.1-dev: 22 GiB in bf16) can be distilled.

Why torch's ``fully_shard`` (FSDP2) and not accelerate's FSDP plugin: FSDP2 keeps module names and the modules
themselves, so bksdm's feature hooks (registered on the blocks before sharding) keep firing and the frozen teacher
shards like the student; and it runs on CPU processes with gloo, where it is tested. accelerate 1.15 turns an FSDP
plugin on CPU into plain DDP without a word, and FSDP1 needs an accelerator (docs/sharding.md, probes). What the
Trainer does differently when sharded (each item of docs/sharding.md's list):

- a run needs two or more processes, bf16 or fp32, torch >= 2.6 and no accelerate FSDP plugin (:func:`check_launch`);
- every block of each model (:func:`shard_units`) is its own FSDP unit, then the root; the teacher is sharded too
  and never given to ``accelerate.prepare`` (DDP refuses a model without trainable parameters);
- the optimiser and the EMA are made from the sharded parameters (FSDP2 replaces the parameter objects);
- mixed precision is FSDP's ``MixedPrecisionPolicy`` (``param_dtype`` bf16/fp16, fp32 master weights and
  gradient reduction) instead of accelerate's autocast;
- checkpoints hold the model, optimiser and EMA shards through ``torch.distributed.checkpoint`` (:func:`save`,
  :func:`load`; a resume needs the same number of processes, as every bksdm resume does) beside accelerate's
  state (learning-rate schedule, random states); the weights in a checkpoint and ``OUT/final`` are gathered on every
  process (a collective) and written by the first (:func:`gather`).

Source: PyTorch's FSDP2 API (``torch.distributed.fsdp.fully_shard``, ``torch.distributed.checkpoint.state_dict``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks")
"""The block lists whose items become FSDP units (SD3 / Flux transformers, U-Nets); ``mid_block`` too."""


def check_launch(acc: Any, mixed_precision: str) -> None:
    """One-line errors for a ``shard: fsdp2`` run that cannot work: a single process, accelerate's own FSDP plugin,
    fp16 (its loss scaler needs the prepared optimiser, which a sharded run does not have), a torch without FSDP2."""
    from bksdm.errors import UserError

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        raise UserError(f"shard fsdp2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                        f"{torch.__version__}") from None
    if acc.num_processes < 2:
        raise UserError("shard fsdp2 splits the models over processes and this run has one: launch it with "
                        "torchrun --nproc_per_node N (N >= 2), or use shard none")
    if str(acc.distributed_type).endswith("FSDP"):
        raise UserError("shard fsdp2 shards the models itself: launch without accelerate's FSDP plugin "
                        "(accelerate launch --multi_gpu, or torchrun)")
    if mixed_precision == "fp16":
        raise UserError("shard fsdp2 with fp16 has no loss scaling: use mixed_precision bf16 (or no)")


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of ``model`` (a diffusers transformer or U-Net) that become FSDP units, forward order."""
    units = [b for name in BLOCK_LISTS for b in getattr(model, name, None) or []]
    mid = getattr(model, "mid_block", None)
    return units + ([mid] if mid is not None else [])


def fully_shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard ``model`` in place: each of :func:`shard_units` is an FSDP2 unit, then the root (embedders, norms, the
    output projection). ``param_dtype``: compute dtype of the gathered weights (the shards stay in their dtype;
    gradients are reduced in fp32). Needs an initialised process group (accelerate's, under ``torchrun`` or
    ``accelerate launch``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def gather(model: torch.nn.Module, first: bool) -> torch.nn.Module | None:
    """A plain (unsharded, fp32, CPU) copy of the sharded diffusers ``model`` on the process where ``first`` is
    true, ``None`` on the others. A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not first:
        return None
    copy = type(model).from_config(model.config)
    copy.load_state_dict(full)
    return copy.float()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optimizer": opt_sd, "extra": dict(extra)}


def save(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> None:
    """Write the shards of ``model``, ``opt`` and ``extra`` (e.g. the EMA's shadow shards) to ``folder``, each
    process its own (``torch.distributed.checkpoint``). A collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, opt, extra), checkpoint_id=str(folder))


def load(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> None:
    """Read back what :func:`save` wrote, into the live shards (``dcp.load`` fills ``extra``'s tensors in place)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, opt, extra)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except BaseException as exc:  # CheckpointException is a BaseException: make it one errors.reading reports
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise RuntimeError(f"sharded state {folder}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
