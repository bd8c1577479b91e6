"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for zeroth-order training.

Outside a forward, FSDP2 parameters are DTensors sharded on dim 0; the optimizer perturbs
and updates each rank's local rows in place, with the rows of the full parameter's noise
(:func:`zotune.distributed.local_rows_of`), so the trajectory is the unsharded one.

One FSDP2 default must change: the *root* module keeps its parameters all-gathered after a
forward (a heuristic for training, where backward follows at once). Under ``no_grad`` nothing
reshards them, so the next perturbation would edit the shards while the following forward
reuses the stale gathered copy -- the root's parameters would silently never be perturbed.
:func:`prepare_module` (called by :class:`~zotune.distributed.ProcessGroupComm` when an optimizer
is built from a module, and by :func:`fully_shard_for_zo`) sets ``reshard_after_forward=True`` on every FSDP module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zotune.optim.comm import refuse_meta_parameters


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def is_fsdp_module(module: nn.Module) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def prepare_module(model: nn.Module) -> nn.Module:
    """Make ``model`` safe for in-place ZO perturbation; returns it.

    * FSDP2 modules: reshard after every forward (also the root) and reshard now, so the
      parameters registered on the modules are the sharded DTensors the optimizer edits.
    * Trainable parameters on the ``meta`` device (accelerate CPU/disk offload, or a model
      that was never materialised) are refused with their names: they hold no data to
      perturb. Frozen offloaded weights (PEFT on an offloaded base model) are fine.

    Does nothing else and issues no collective.
    """
    refuse_meta_parameters(model)
    cls = _fsdp_module_class()
    if cls is None:
        return model
    fsdp_modules = [m for m in model.modules() if isinstance(m, cls)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(True, recurse=False)  # type: ignore[attr-defined]
    for m in fsdp_modules:
        m.reshard()  # type: ignore[attr-defined]
    return model


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of the outermost ``nn.ModuleList``s (the decoder layers of HF models)."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(child)
            else:
                visit(child)

    visit(model)
    return units


def fully_shard_for_zo(
    model: nn.Module,
    *,
    mesh: Any = None,
    units: list[nn.Module] | None = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Shard ``model`` with FSDP2 for ZO training and return it.

    ``units`` (default: :func:`default_shard_units`, i.e. each decoder layer) are sharded one
    by one, then the root (which takes the remaining parameters: embeddings, final norm,
    head), all with ``reshard_after_forward=True``, so at most one unit is gathered at a time
    during a forward. ``mesh`` defaults to a 1-D mesh over all ranks on this rank's device
    type; pass a 2-D ``(replicate, shard)`` mesh for HSDP. Extra keyword arguments go to
    ``fully_shard`` (e.g. ``mp_policy``). Call it after ``init_distributed()``.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fully_shard_for_zo needs an initialised process group: call init_distributed() first")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    fsdp_kwargs["reshard_after_forward"] = True
    for unit in default_shard_units(model) if units is None else units:
        fully_shard(unit, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return prepare_module(model)
