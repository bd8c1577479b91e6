"""Zeroth-order optimizers with a ``torch.optim`` interface.

    >>> import torch, zotune.optim as zo
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = zo.create("mezo", [w], lr=0.05, eps=1e-3)
    >>> for _ in range(200):
    ...     _ = opt.step(lambda: (w ** 2).sum())
    >>> bool((w ** 2).sum() < 1.0)
    True
"""

from zotune.optim.dizo import DiZO
from zotune.optim.engine import NonFiniteLoss, ZOOptimizer, trainable_param_groups
from zotune.optim.fzoo import FZOO
from zotune.optim.helene import HELENE
from zotune.optim.hizoo import HiZOO
from zotune.optim.hizoo_lowrank import HiZOOLowRank
from zotune.optim.lazy import flush_pending
from zotune.optim.lozo import LOZO, LOZOM
from zotune.optim.registry import available, create, get, register
from zotune.optim.sparse_mezo import SparseMeZO
from zotune.optim.subzero import SubZero
from zotune.optim.zo_adam import ZOAdam
from zotune.optim.zo_adamu import ZOAdaMU
from zotune.optim.zo_conservative import ZOSGDConservative
from zotune.optim.zo_momentum import ZOSGDMomentum
from zotune.optim.zo_muon import ZOMuon
from zotune.optim.zo_sgd import ZOSGD
from zotune.optim.zo_sign import ZOSGDSign

for _cls in (ZOSGD, ZOSGDMomentum, ZOSGDConservative, ZOSGDSign, ZOAdam, ZOAdaMU, HiZOO, HiZOOLowRank, HELENE,
             FZOO, SparseMeZO, DiZO):
    register(_cls)
for _cls in (LOZO, LOZOM, SubZero, ZOMuon):  # matrix-structured perturbations (zotune.optim.lowrank)
    register(_cls)

__all__ = [
    "FZOO",
    "HELENE",
    "LOZO",
    "LOZOM",
    "ZOSGD",
    "DiZO",
    "HiZOO",
    "HiZOOLowRank",
    "NonFiniteLoss",
    "SparseMeZO",
    "SubZero",
    "ZOAdaMU",
    "ZOAdam",
    "ZOMuon",
    "ZOOptimizer",
    "ZOSGDConservative",
    "ZOSGDMomentum",
    "ZOSGDSign",
    "available",
    "create",
    "flush_pending",
    "get",
    "register",
    "trainable_param_groups",
]
