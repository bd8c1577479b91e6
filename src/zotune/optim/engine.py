"""The SPSA engine shared by every zotune optimizer.

:class:`ZOOptimizer` owns everything that is the same for all zeroth-order methods:

* **seeding** -- step ``t`` draws its directions from ``mix_seed(seed, t, sample)``; the
  step counter is the whole RNG position, so a checkpoint resumes the same trajectory;
* **perturbation** -- :meth:`ZOOptimizer._displace` moves the parameters along a direction
  ``u`` regenerated block by block from the seed (never materialised in full, see
  :mod:`zotune.optim.noise`), on several worker threads;
* **restore + update** -- :meth:`ZOOptimizer._update` undoes the pending displacement and
  applies the method's update rule in the *same* pass over each block, so one step costs
  the forwards plus three regenerations of z (MeZO's reference code needs four);
* **lazy fused update** -- with ``lazy_update=True`` that restore + update pass is deferred
  and run inside the first perturbation pass of the next step (ZO2's rule), so a steady-state
  step makes two passes over the weights instead of three; the pending update is flushed
  before anything can observe the weights (see :mod:`zotune.optim.lazy`);
* **safety** -- if the closure raises, or a loss is NaN/inf, the parameters are restored
  before the exception propagates (NaN steps are skipped and counted in
  ``optimizer.zo_state["skipped_steps"]``);
* **precision** -- bf16/fp16 parameters get an fp32 master copy: perturbed weights are
  written as ``round(master + c*u)`` and restored as ``round(master)``, so they never drift,
  and updates smaller than a low-precision ulp are not lost. All optimizer state is fp32.
  fp32 parameters are perturbed in place; the +c/-2c/+c round trip then restores them to
  within one rounding (a few 1e-8 relative). ``exact_restore=True`` keeps an fp32 shadow
  copy (+1x trainable parameters) and makes restores bit-exact;
* **communication** -- everything the engine needs from its runtime goes through a
  :class:`~zotune.optim.comm.Communicator` (``comm=``): the local rows of a sharded
  parameter, the mean of the loss scalars over data-parallel ranks, a hook after each step.
  ``zotune.distributed.ProcessGroupComm`` implements it for ``torch.distributed``: every rank
  draws the same directions and only the loss scalars are all-reduced;
* **layer sampling** -- with ``layer_fraction < 1`` each step perturbs and updates only a
  subset of the layers chosen from (seed, step) (:mod:`zotune.optim.layers`); the sweeps skip
  the other layers entirely;
* **frozen weights** -- parameters with ``requires_grad=False`` are skipped everywhere
  (perturbation, update, state), as torch.optim skips parameters without a gradient; noise
  indices count trainable parameters only (see :meth:`ZOOptimizer._build_slots`).

A method is a subclass that implements :meth:`ZOOptimizer._zo_step` (its sequence of
forwards and displacements) and usually :meth:`ZOOptimizer.direction` (how the raw noise
becomes the perturbation direction) and :meth:`ZOOptimizer.init_state`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from zotune.optim.blocks import Block, NonFiniteLoss, StepRecord, _Slot, trainable_param_groups
from zotune.optim.checks import check_choice, check_range
from zotune.optim.checks import check_positive_int as check_positive_int  # re-exported for the methods
from zotune.optim.comm import Communicator
from zotune.optim.layers import LAYER_SCHEDULES
from zotune.optim.lazy import LazyHooks, Part, group_snapshot, register_lazy
from zotune.optim.noise import DISTRIBUTIONS, default_block_size, mix_seed
from zotune.optim.sweep import LOW_PRECISION, BlockSweep, Noises

Closure = Callable[[], Any]
Coefficient = float | Sequence[float] | Callable[[dict], float]


class ZOOptimizer(BlockSweep, torch.optim.Optimizer):
    """Base class of zotune's zeroth-order optimizers (see the module docstring).

    Args:
        params: an iterable of tensors or parameter-group dicts (as for any
            ``torch.optim.Optimizer``), or an ``nn.Module``: then its trainable parameters
            are used, split into decay/no-decay groups, and the module is put in eval mode
            for the forwards of every step. Prefer the module; to pass a list, filter it
            (``[p for p in model.parameters() if p.requires_grad]``).
        defaults: per-group hyperparameters (``lr``, ``weight_decay``, ...).
        eps: perturbation scale (MeZO's ``zo_eps``; one value for all groups).
        seed: base seed of the direction stream.
        distribution: ``"gaussian"`` (default) or ``"rademacher"``.
        block_size: elements per noise block (part of the noise contract); default
            ``noise.default_block_size`` of the device that generates the noise (2**18 on the
            CPU, 2**22 on CUDA, where each block costs a fixed ~50 us of launches).
        num_threads: worker threads for CPU passes (default: ``torch.get_num_threads()``,
            at most 4). The result does not depend on it.
        exact_restore: keep an fp32 shadow copy of fp32 parameters so restores are
            bit-exact (+1x trainable parameter memory). Low-precision parameters always
            have an fp32 master.
        noise_device: generate noise on this device instead of the parameter's own.
        comm: the runtime (:class:`~zotune.optim.comm.Communicator`); ``None``: one process.
            For data parallelism or FSDP2 pass ``zotune.distributed.ProcessGroupComm(group,
            check_every=K)`` (K: steps between checks that all ranks hold identical weights).
        layer_fraction: perturb and update only this fraction of the layers per step, chosen
            from the step seed (LeZO / MeZO-BCD; see :mod:`zotune.optim.layers`). The other
            layers and their optimizer state are not touched: no noise, no pass. 1.0: all.
        layer_schedule: the order of the layer subsets: ``"random"`` (LeZO), ``"cyclic"`` or
            ``"permuted"`` (MeZO-BCD's cyclic orders; see :mod:`zotune.optim.layers`).
        lazy_update: defer each step's restore + update pass into the next step's first
            perturbation pass (2 passes per step instead of 3; the same arithmetic, so the
            trajectory is bit-identical). Between steps the weights then sit at
            ``theta - eps z`` with the update pending: :meth:`flush` applies it, and so do
            ``state_dict()``, the module's ``state_dict()`` / ``load_state_dict()`` / forward
            (when the optimizer was built from the module), evaluation and checkpoints in
            zotune's own loops. Reading ``p.data`` directly needs :meth:`flush` first, which is
            why the default is ``False`` (plain torch.optim semantics). Only methods whose
            class sets ``lazy_capable`` defer; the others ignore the flag.
    """

    # Everything zotune knows about a method lives on its class, so that adding a method means
    # its file and its oracle, nothing else: the registry, the CLI, ``zotune train``'s default
    # lr, ``zotune bench step`` and the common parametrized tests all read these attributes.

    #: other names ``zotune.optim.get`` accepts (case, '-' and '_' ignored); must not collide
    aliases: tuple[str, ...] = ()
    #: the update rule in one line (``zotune optimizers``, ``zotune bench step``)
    summary: str = ""
    #: forward passes per step, the mean over steps (for documentation and benchmarks)
    forwards_per_step: float = 2
    #: independent normal streams the direction needs per seed
    noise_streams: int = 1
    #: d-sized fp32 state buffers the method keeps (memory accounting)
    state_buffers: tuple[str, ...] = ()
    #: published starting lr per tuning mode (``full``, ``lora``, ``prefix``; ``zotune train``
    #: derives the norm-only modes from ``lora``); modes not listed use the constructor's lr
    lr_by_mode: dict[str, float] = {}
    #: the slow oracle the fast code must match step by step: a :class:`~zotune.optim.reference.ReferenceZO`
    #: subclass or its ``"module:Class"`` path (imported only by tests)
    reference: str | type | None = None
    #: hyperparameters for the small regression problem of the common tests (lr that moves the
    #: weights visibly without diverging, short schedules)
    test_kwargs: dict[str, Any] = {"lr": 1e-3}
    #: extra ``zotune bench step`` rows with non-default constructor options
    bench_variants: tuple[dict[str, Any], ...] = ()
    #: the update kernel may run deferred, inside the next step's first displacement pass
    #: (``lazy_update=True``): it captures every per-step value it reads, reads only its own
    #: block's state, and the next step displaces before it forwards or reads weights/state
    lazy_capable: bool = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | nn.Module,
        defaults: dict[str, Any],
        *,
        eps: float = 1e-3,
        seed: int = 0,
        distribution: str = "gaussian",
        block_size: int | None = None,
        num_threads: int | None = None,
        exact_restore: bool = False,
        noise_device: str | torch.device | None = None,
        comm: Communicator | None = None,
        layer_fraction: float = 1.0,
        layer_schedule: str = "random",
        lazy_update: bool = False,
    ):
        check_range("eps", eps, 0.0, low_open=True)
        check_range("lr", defaults.get("lr", 0.0), 0.0)
        check_range("weight_decay", defaults.get("weight_decay", 0.0), 0.0)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_range("layer_fraction", layer_fraction, 0.0, 1.0, low_open=True, high_open=False)
        check_choice("layer_schedule", layer_schedule, LAYER_SCHEDULES)
        if block_size is not None and block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.comm = comm if comm is not None else Communicator()
        self.module: nn.Module | None = None
        if isinstance(params, nn.Module):
            self.module = self.comm.prepare_module(params)  # FSDP2: reshard after forward; refuse meta
            params = trainable_param_groups(params, defaults.get("weight_decay", 0.0))
        super().__init__(params, defaults)
        self.eps = float(eps)
        self.distribution = distribution
        self.exact_restore = bool(exact_restore)
        self.noise_device = torch.device(noise_device) if noise_device is not None else None
        self._block_size_given = block_size is not None
        if block_size is None:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            block_size = default_block_size(self.noise_device or (first.device if first is not None else "cpu"))
        self.block_size = int(block_size)
        self.num_threads = num_threads
        self.layer_fraction = float(layer_fraction)
        self.layer_schedule = layer_schedule
        #: global scalars: saved by state_dict(), restored by load_state_dict()
        self.zo_state: dict[str, Any] = {
            "seed": int(seed),
            "step": 0,
            "skipped_steps": 0,
            "updates": 0,
            "forwards": 0,
            "last_losses": [],
            "last_projected_grads": [],
        }
        self._slots: list[_Slot] | None = None
        self._signature: tuple[bool, ...] = ()
        self._record: StepRecord | None = None
        self._replay: list[float] | None = None
        #: what the last step drew and used (seeds, losses, projected gradients, lrs): appended
        #: to a run's trajectory file by the training loop, fed back by :meth:`replay_step`
        self.last_step_record: StepRecord | None = None
        self._pending: dict[int, list[float]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closureless_step_is_noop = False
        self.lazy_update = bool(lazy_update)
        self._deferred: Part | None = None  # the previous step's restore + update, not yet applied
        self._defer_ok = False  # this step's update may be deferred (set at the start of a step)
        self._in_step = False
        #: sweeps over the weights (passes), updates deferred, deferred updates flushed on their own
        self.pass_counts = {"passes": 0, "deferred": 0, "flushed": 0}
        self._hooks: LazyHooks | None = None
        if self.lazy_update:
            register_lazy(self)
            if self.module is not None:
                self._hooks = LazyHooks(self, self.module)

    # ------------------------------------------------------------------ method hooks
    def init_state(self, param: torch.Tensor, state: dict) -> None:
        """Create the per-parameter state (fp32 tensors of the parameter's local shape)."""

    def zeros_state(self, param: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A state buffer for ``param``: its local shape, fp32 (fp64 for fp64 parameters)."""
        local, _, _ = self.comm.local_rows(param)
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        return torch.full(local.shape, fill, dtype=dtype, device=local.device)

    def direction(self, block: Block, noise: list[torch.Tensor]) -> torch.Tensor:
        """The perturbation direction u for one block, from its raw noise streams."""
        return noise[0]

    def direction_for(self, block: Block, noise: list[torch.Tensor], seed: int) -> torch.Tensor:
        """The direction of ``seed`` for one block; the engine always calls this one.

        The default is :meth:`direction` of the block's own noise. Methods whose direction of
        a block also depends on per-parameter factors of the seed (low-rank perturbations)
        override this instead.
        """
        return self.direction(block, noise)

    def noise_generated_on(self, device: torch.device | str) -> None:
        """Say where the noise will be generated when that is not where the weights are now (streaming
        offload keeps them in CPU memory and perturbs them on the GPU): before the first step, a
        default block size becomes that device's (``noise.default_block_size``); a given one stays."""
        if not self._block_size_given and self._slots is None and self.zo_state["step"] == 0:
            self.block_size = default_block_size(self.noise_device or device)

    def slot_noise_streams(self, param: torch.Tensor) -> int:
        """Noise streams to generate for one parameter (0: its direction needs no block noise)."""
        return self.noise_streams

    def _zo_step(self, closure: Closure) -> float:
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step. ``closure()`` runs a forward pass and returns the loss.

        The closure must not call ``backward()``; it may return any scalar to minimise
        (a loss, a negative accuracy, ...). It is called under ``torch.no_grad()`` and, if
        the optimizer was built from a module, with that module in eval mode. Returns the
        loss estimate of this step (the method's ``L(theta)`` or the mean of ``L(theta +- eps u)``).
        """
        if closure is None:
            if self._closureless_step_is_noop:
                self._closureless_step_is_noop = False
                return torch.tensor(float("nan"))
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs a forward pass and "
                "returns the loss (zeroth-order optimizers do not use .grad)"
            )
        self._in_step = True
        try:
            self._prepare()
            self._defer_ok = self.lazy_update and self.lazy_capable and self.lazy_step_ok()
            if not self._defer_ok:
                self.flush()  # this step may read theta before it displaces
        except BaseException:
            self._in_step = False
            raise
        module, was_training = self.module, bool(self.module is not None and self.module.training)
        if module is not None:
            module.eval()
        self._pending = {}
        self._record = StepRecord(self.step_count, [], [], [], [float(g["lr"]) for g in self.param_groups])
        try:
            loss = self._zo_step(closure)
            self.zo_state["updates"] += 1
        except NonFiniteLoss as e:
            self._abort_step()  # a NaN step: nothing of it is deferred, the weights are theta
            self.zo_state["skipped_steps"] += 1
            self.zo_state["last_losses"] = e.losses
            loss = float("nan")
        except BaseException:
            self._abort_step()
            raise
        finally:
            self._in_step = self._defer_ok = False
            if module is not None and was_training:
                module.train()
        self._record.projected_grads = [float(c) for c in self.zo_state["last_projected_grads"]]
        self.last_step_record, self._record = self._record, None
        self.zo_state["step"] += 1
        self._after_step()
        return torch.tensor(loss, dtype=torch.float32)

    def skip_next_closureless_step(self) -> None:
        """Make the next ``step()`` called *without* a closure a no-op (it returns NaN).

        For training loops that call ``optimizer.step()`` after an integration has already
        taken the zeroth-order step inside the loss computation (``transformers.Trainer``).
        """
        self._closureless_step_is_noop = True

    def lazy_step_ok(self) -> bool:
        """Whether this step may start with the previous update still pending (``lazy_capable``
        methods whose rule reads theta on some steps only, like DiZO's projection steps, override it)."""
        return True

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending (deferred) update now; a no-op without one. Safe to call any time."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self.pass_counts["flushed"] += 1
            self._sweep_parts([deferred])

    @property
    def has_pending_update(self) -> bool:
        """True between steps while ``lazy_update`` holds a deferred update (weights at theta - eps z)."""
        return self._deferred is not None

    def _abort_step(self) -> None:
        """After an exception or a NaN inside a step: weights back to where the step started, updated."""
        self._restore_pending()
        self.flush()  # the previous step's update, if this step failed before fusing it

    @torch.no_grad()
    def replay_step(self, record: StepRecord) -> None:
        """Redo a recorded step without running forwards: its losses are fed to the method.

        The displacements, restores and updates are the very same operations as in the
        recorded run, so the parameters and the state end bit-identical to it. Raises
        ``ValueError`` if this optimizer draws other seeds than the record (another seed,
        step or noise version) or derives other projected gradients.
        """
        if record.step != self.step_count:
            raise ValueError(f"record of step {record.step} replayed at step {self.step_count}")
        for group, lr in zip(self.param_groups, record.lrs):
            group["lr"] = lr
        self._replay = list(record.losses)
        try:
            self.step(lambda: 0.0)
        finally:
            left, self._replay = self._replay, None
        done = self.last_step_record
        if done.seeds != record.seeds or left or done.projected_grads != record.projected_grads:
            raise ValueError(f"step {record.step} does not replay: seeds {done.seeds} vs recorded {record.seeds}, "
                             f"projected gradients {done.projected_grads} vs {record.projected_grads}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """ZO optimizers never read ``.grad``; this only clears stray gradients."""
        super().zero_grad(set_to_none=set_to_none)

    @property
    def step_count(self) -> int:
        return int(self.zo_state["step"])

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        sd = super().state_dict()
        sd["zotune"] = {
            **{k: (list(v) if isinstance(v, list) else v) for k, v in self.zo_state.items()},
            "eps": self.eps,
            "distribution": self.distribution,
            "block_size": self.block_size,
            "layer_fraction": self.layer_fraction,
            "layer_schedule": self.layer_schedule,
            "class": type(self).__name__,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = dict(state_dict.get("zotune", {}))
        self.flush()  # the pending update belongs to the old state
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; zotune state is fp32
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            for key, value in saved.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                    self.state[p][key] = value.detach().to(device=p.device, dtype=dtype).clone()
        if extra:
            cls = extra.pop("class", type(self).__name__)
            if cls != type(self).__name__:
                raise ValueError(f"state_dict is from {cls}, not {type(self).__name__}")
            self.eps = float(extra.pop("eps", self.eps))
            self.distribution = extra.pop("distribution", self.distribution)
            self.block_size = int(extra.pop("block_size", self.block_size))
            self.layer_fraction = float(extra.pop("layer_fraction", self.layer_fraction))
            self.layer_schedule = extra.pop("layer_schedule", self.layer_schedule)
            self.zo_state.update(extra)
        self._slots = None

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_deferred", None) is not None:
            self.flush()
        super().add_param_group(param_group)
        self._slots = None

    def __getstate__(self) -> dict[str, Any]:
        self.flush()  # a deferred update holds closures: apply it rather than copy it
        state = dict(self.__dict__)
        state["_hooks"] = None
        state["_pool"] = None
        state["_pool_lock"] = None
        state["_slots"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pool_lock = threading.Lock()
        if self.lazy_update:
            register_lazy(self)
            if self.module is not None:
                self._hooks = LazyHooks(self, self.module)

    # ------------------------------------------------------------------ building blocks for methods
    def _seed(self, sample: int = 0) -> int:
        """Seed of direction ``sample`` of the current step (pure function of seed, step)."""
        seed = mix_seed(self.zo_state["seed"], self.zo_state["step"], sample)
        if self._record is not None and seed not in self._record.seeds:
            self._record.seeds.append(seed)
        return seed

    def _forward(self, closure: Closure) -> float:
        """Run the closure once and return its (local) loss as a float."""
        if self._deferred is not None:
            self.flush()  # a forward at theta (before any displacement) must see the update
        loss = closure()
        self.zo_state["forwards"] += 1
        if torch.is_tensor(loss):
            return float(loss.detach().float().mean().item())
        return float(loss)

    def _reduce(self, *losses: float) -> list[float]:
        """Average losses over the data-parallel group and refuse non-finite ones."""
        if self._replay is not None:  # replay_step: the recorded (already reduced) values
            values, self._replay = self._replay[: len(losses)], self._replay[len(losses) :]
            if len(values) != len(losses):
                raise ValueError("the record has fewer losses than the step uses")
        else:
            values = self.comm.all_reduce_mean(list(losses), what=f"{type(self).__name__} step {self.step_count}")
        if self._record is not None:
            self._record.losses.extend(values)
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLoss(values)
        return values

    def _two_point(self, closure: Closure, seed: int) -> tuple[float, float]:
        """Evaluate L(theta + eps u) and L(theta - eps u); leaves theta displaced by -eps u."""
        self._displace(seed, self.eps)
        plus = self._forward(closure)
        self._displace(seed, -2.0 * self.eps)
        minus = self._forward(closure)
        plus, minus = self._reduce(plus, minus)
        return plus, minus

    def _spsa(self, closure: Closure, seed: int) -> tuple[float, float, float]:
        """Two-point SPSA: (L+, L-, c = (L+ - L-) / 2 eps), recorded in ``zo_state``."""
        plus, minus = self._two_point(closure, seed)
        c = (plus - minus) / (2.0 * self.eps)
        self.zo_state["last_losses"] = [plus, minus]
        self.zo_state["last_projected_grads"] = [c]
        return plus, minus, c

    def _displace(self, seed: int, coef: Coefficient) -> None:
        """Move the parameters by ``coef * u(seed)`` (``coef`` may depend on the group)."""
        if callable(coef):
            coefs = [float(coef(g)) for g in self.param_groups]
        elif isinstance(coef, Sequence):
            coefs = [float(c) for c in coef]
        else:
            coefs = [float(coef)] * len(self.param_groups)
        before = self._pending.get(seed, [0.0] * len(coefs))
        after = [b + c for b, c in zip(before, coefs)]

        def kernel(block: Block, noises: Noises) -> None:
            gi = block.slot.group_index
            if coefs[gi] == 0.0:
                return
            u = self.direction_for(block, noises[0], seed)
            if block.slot.master is None:
                block.param.add_(u, alpha=coefs[gi])  # block.param is the block's rows of the weight itself
            else:
                block.slot.data[block.r0 : block.r1].copy_(torch.add(block.param, u, alpha=after[gi]))

        self._sweep([seed], kernel)
        self._pending[seed] = after

    def _take_deferred(self) -> list[Part]:
        """The deferred update as the first part of the coming sweep (each block gets it first)."""
        deferred, self._deferred = self._deferred, None
        return [deferred] if deferred is not None else []

    def _restore(self, seed: int) -> None:
        """Undo the pending displacement along ``u(seed)``."""
        offsets = self._pending.get(seed)
        if offsets is None:
            return
        self._displace(seed, [-o for o in offsets])
        del self._pending[seed]

    def _update(self, seeds: Sequence[int], kernel: Callable[[Block, Noises], None]) -> None:
        """One pass: undo pending displacements of ``seeds``, then apply ``kernel`` per block.

        ``kernel(block, noises)`` updates ``block.param`` (fp32) and the method's state;
        ``noises[i]`` are the raw noise streams of ``seeds[i]``. Displacements of seeds not in
        ``seeds`` must have been restored before.
        """
        leftover = set(self._pending) - set(seeds)
        if leftover:
            raise RuntimeError(f"pending displacements {sorted(leftover)} must be restored first")
        offsets = [self._pending.pop(s, None) for s in seeds]

        def fused(block: Block, noises: Noises) -> None:
            gi = block.slot.group_index
            if block.slot.master is None:
                for off, noise, seed in zip(offsets, noises, seeds):
                    if off is not None and off[gi] != 0.0:
                        block.param.add_(self.direction_for(block, noise, seed), alpha=-off[gi])
            kernel(block, noises)
            if block.slot.master is not None:
                block.slot.data[block.r0 : block.r1].copy_(block.param)

        if self._defer_ok:
            # lazy: run in the next step's first displacement (or at a flush); the kernel sees
            # the groups as they are now, so an lr change in between does not leak into it
            self.flush()
            self._deferred = Part(self.active_slots(), list(seeds), fused, group_snapshot(self.param_groups))
            self.pass_counts["deferred"] += 1
            return
        self._sweep(list(seeds), fused)

    def _restore_pending(self) -> None:
        """Put the parameters back where the step started (after an exception/NaN)."""
        if not self._pending:
            return
        slots = self._slots or []
        if slots and all(s.master is not None for s in slots):
            for s in slots:
                s.data.copy_(s.master)
        else:
            for seed in list(self._pending):
                self._restore(seed)
        self._pending = {}

    def _after_step(self) -> None:
        """Hook run after every step (the communicator's replica check lives there)."""
        self.comm.after_step(self)

    # ------------------------------------------------------------------ the block sweep
    def _prepare(self) -> None:
        if self._slots is None or self._signature != self._trainable_signature():
            self.flush()  # with the slots it was made for
            self._slots = self._build_slots()  # (re)built when parameters are frozen or unfrozen
        for slot in self._slots:
            state = self.state[slot.param]
            if not state.get("_initialised", False):
                self.init_state(slot.param, state)
                state["_initialised"] = True
        if self.exact_restore and self._deferred is None:  # pending: the weights are displaced, not edited
            for slot in self._slots:
                if slot.param.dtype not in LOW_PRECISION and slot.master is not None:
                    slot.master.copy_(slot.data)  # refresh the shadow in case weights were edited

    def __repr__(self) -> str:
        hp = {k: v for k, v in self.defaults.items()}
        return f"{type(self).__name__}(eps={self.eps}, distribution={self.distribution!r}, {hp})"
