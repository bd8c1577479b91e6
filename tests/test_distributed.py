"""Data-parallel and FSDP2 zeroth-order training with 2 gloo processes on the CPU.

One 2-process run (this file started as a script, ``python tests/test_distributed.py OUTDIR``,
by :func:`zotune.distributed.launch_local` with torchrun's environment variables, so it also
exercises ``init_distributed()``) plays every multi-process scenario in turn -- data parallel,
replica divergence, FSDP2, the bench measurement, a hung rank, a dead rank -- and each rank
saves what it saw; the tests compare that with single-process runs done here. One launch
because starting a process that imports torch and builds a torch.optim optimizer costs
several seconds on this machine. The run is bounded by ``LAUNCH_TIMEOUT_S``; the fault
scenarios by their collective timeouts. Models are plain ``torch.nn`` (no transformers).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import zotune.optim as zo
from zotune.distributed import (
    COMM_STATS,
    DistContext,
    DistributedError,
    ProcessGroupComm,
    ReplicaDivergenceError,
    check_replicas,
    fully_shard_for_zo,
    init_distributed,
    launch_local,
    local_rows_of,
    prepare_module,
    tensor_checksum,
)
from zotune.errors import UserError

GLOBAL_BATCH = 8
STEPS = 6
CHECK_EVERY = 2
# rows_per_block = 3 for the (7, 6) weights, so block 1 (rows 3..5) straddles the FSDP2 shard
# boundary at row 4, and every bias is one block split between the ranks
BLOCK_SIZE = 20
OPTIMIZERS = {"ZOSGD": dict(lr=0.05, eps=1e-3), "ZOAdam": dict(lr=1e-2, eps=1e-3),
              # matrix-structured: factors sliced to each shard's rows; one all-reduce per ZO-Muon query
              "LOZO": dict(lr=0.05, eps=1e-3, rank=2, interval=3),
              "ZOMuon": dict(lr=1e-2, eps=1e-3, rank=2, interval=3, queries=2)}
TRAIN_KW = dict(seed=11, block_size=BLOCK_SIZE)
HANG_TIMEOUT_S = 3.0  # collective timeout of the group on which rank 1 hangs
MAIN_TIMEOUT_S = 20.0  # collective timeout of the main group (rank 0 meets the dead rank 1 there)
LAUNCH_TIMEOUT_S = 150.0  # the whole 2-process run


class Net(nn.Module):
    """Two tanh layers, a head and a root-level parameter (FSDP2 puts it in the root group)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 7), nn.Linear(7, 7)])
        self.head = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x) * self.scale


def make_net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def train(model: nn.Module, opt: zo.ZOOptimizer, rows: list[int], steps: int = STEPS) -> list[list[float]]:
    """``steps`` ZO steps on the examples ``rows`` of the global batch; the reduced losses per step."""
    x, y = global_batch()
    xs, ys = x[rows], y[rows]
    losses = []
    for _ in range(steps):
        opt.step(lambda: nn.functional.cross_entropy(model(xs), ys))
        losses.append(list(opt.zo_state["last_losses"]))
    return losses


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def single_process(name: str) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    model = make_net()
    opt = zo.create(name, model.parameters(), **OPTIMIZERS[name], **TRAIN_KW)
    losses = train(model, opt, list(range(GLOBAL_BATCH)))
    return full_weights(model), losses


# ---------------------------------------------------------------------------------------- workers
def worker_main(ctx: DistContext, out: Path) -> None:
    res: dict = {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend}
    res["broadcast"] = ctx.broadcast_object({"secret": 42} if ctx.is_main else None)
    rows = ctx.shard(list(range(GLOBAL_BATCH)))
    res["rows"] = rows
    for name, hp in OPTIMIZERS.items():
        COMM_STATS.reset()
        model = make_net()
        opt = zo.create(name, model.parameters(), **hp, **TRAIN_KW, comm=ctx.comm(check_every=CHECK_EVERY))
        losses = train(model, opt, rows)
        res[f"dp/{name}"] = {"weights": full_weights(model), "losses": losses, "comm": COMM_STATS.snapshot()}
        if name == "ZOSGD":
            # one rank's weights drift by one ulp-ish amount -> the next check must fire on both
            if ctx.rank == 1:  # layers.1.weight: parameter index 3 (the root's `scale` comes first)
                with torch.no_grad():
                    model.layers[1].weight[2, 3] += 1e-6
            try:
                train(model, opt, rows, steps=CHECK_EVERY)
                res["divergence"] = None
            except ReplicaDivergenceError as e:
                res["divergence"] = {"message": str(e), "step": opt.step_count}
    # the lazy fused update (2 passes per step) with the data-parallel comm and with FSDP2: the same
    # weights as the eager runs above; the replica check (every CHECK_EVERY steps) flushes first
    for name in ("ZOSGD", "ZOAdam"):
        for how in ("dp", "fsdp"):
            model = make_net()
            if how == "fsdp":
                fully_shard_for_zo(model)
            opt = zo.create(name, model, **OPTIMIZERS[name], **TRAIN_KW, lazy_update=True,
                            comm=ctx.comm(check_every=4))  # checks (and flushes) at step 4; step 6 stays pending
            losses = train(model, opt, rows)
            pending = opt.has_pending_update
            with torch.no_grad():  # a forward outside a step (evaluation): the hook flushes first
                seen = model(global_batch()[0])
            res[f"lazy-{how}/{name}"] = {"weights": full_weights(model), "losses": losses, "pending": pending,
                                         "flushed": not opt.has_pending_update, "out": seen.detach().clone(),
                                         "deferred": opt.pass_counts["deferred"], "flushes": opt.pass_counts["flushed"]}
    # FSDP2, two ways: zotune's helper + params; plain fully_shard + optimizer built from the module
    from torch.distributed.fsdp import fully_shard

    for name in OPTIMIZERS:
        COMM_STATS.reset()
        model = make_net()
        if name == "ZOSGD":
            fully_shard_for_zo(model)
            params = list(model.parameters())
        else:
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)  # the root keeps gathered params after forward unless prepared
            params = model
        res[f"fsdp/{name}/local_shapes"] = [tuple(local_rows_of(p)[0].shape) for p in model.parameters()]
        opt = zo.create(name, params, **OPTIMIZERS[name], **TRAIN_KW, comm=ctx.comm(check_every=1))
        losses = train(model, opt, rows)
        res[f"fsdp/{name}"] = {"weights": full_weights(model), "losses": losses, "comm": COMM_STATS.snapshot()}
    # HSDP on a (replicate=2, shard=1) mesh: parameters are (Replicate, Shard(0)) DTensors; the replica
    # check compares them across the replicate dimension, and must catch a perturbed replica
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    model = fully_shard_for_zo(make_net(), mesh=mesh)
    res["hsdp/placements"] = str(model.layers[0].weight.placements)
    COMM_STATS.reset()
    opt = zo.create("ZOSGD", model, **OPTIMIZERS["ZOSGD"], **TRAIN_KW, comm=ctx.comm(check_every=1))
    losses = train(model, opt, rows)
    res["hsdp/ZOSGD"] = {"weights": full_weights(model), "losses": losses, "comm": COMM_STATS.snapshot()}
    if ctx.rank == 1:
        with torch.no_grad():
            model.head.bias.to_local()[1] += 1e-6
    try:
        train(model, opt, rows, steps=1)
        res["hsdp/divergence"] = None
    except ReplicaDivergenceError as e:
        res["hsdp/divergence"] = str(e)
    # zotune bench scale's measurement with 2 ranks (its byte counts are checked below)
    from zotune.bench.scale import bench_rows

    spec = dict(optimizers=["ZOSGD", "ZOSGDConservative"], shape="mlp", steps=2, batch=4, warmup=1)
    res["bench"] = [vars(r) for r in bench_rows(ctx, spec)]
    torch.set_num_threads(1)
    # faults last: a rank that hangs (on a group with a short timeout), then a rank that dies
    res["hang"] = fault(ctx, "hangs")
    ctx.barrier("barrier after the hang scenario")
    if ctx.rank == 1:
        torch.save(res, out / "rank1.pt")
        os._exit(3)  # dies without a word, like a rank killed by the OOM killer
    res["dies"] = fault(ctx, "dies")
    torch.save(res, out / "rank0.pt")


def fault(ctx: DistContext, mode: str) -> dict | None:
    """Rank 1 sleeps past the timeout ("hangs") or is dead ("dies"); rank 0 steps and must raise."""
    import torch.distributed as dist

    group = dist.new_group(timeout=timedelta(seconds=HANG_TIMEOUT_S)) if mode == "hangs" else ctx.group
    if ctx.rank == 1:
        time.sleep(HANG_TIMEOUT_S + 2)
        return None
    model = make_net()
    opt = zo.create("ZOSGD", model.parameters(), lr=0.01, comm=ProcessGroupComm(group))
    x, y = global_batch()
    t0 = time.monotonic()
    try:
        opt.step(lambda: nn.functional.cross_entropy(model(x[:4]), y[:4]))
    except Exception as e:
        # the engine undoes the +eps/-2eps displacement (fp32 in place: exact up to one rounding)
        start = make_net().parameters()
        restored = all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(model.parameters(), start))
        return {
            "type": type(e).__name__,
            "is_distributed_error": isinstance(e, DistributedError),
            "message": str(e),
            "seconds": time.monotonic() - t0,
            "restored": restored,
        }
    return {"type": None, "message": "no error", "seconds": time.monotonic() - t0}


def _worker(argv: list[str]) -> int:
    torch.set_num_threads(1)
    ctx = init_distributed(timeout_s=MAIN_TIMEOUT_S)
    assert ctx is not None, "not launched with torchrun's environment"
    worker_main(ctx, Path(argv[0]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the default group is broken by the fault scenarios: do not tear it down


# ----------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    r0, r1 = launch_local(
        [sys.executable, __file__, str(out)],
        2,
        timeout_s=LAUNCH_TIMEOUT_S,
        grace_s=MAIN_TIMEOUT_S + 10,  # rank 1 exits with 3 on purpose; rank 0 then meets the dead peer
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r1.returncode == 3, f"rank 1: rc {r1.returncode}, killed {r1.killed}\n{r1.stderr[-4000:]}"
    assert r0.returncode == 0, f"rank 0: rc {r0.returncode}, killed {r0.killed}\n{r0.stderr[-4000:]}"
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]


@pytest.mark.parametrize("how", ["dp", "fsdp"])
@pytest.mark.parametrize("name", ["ZOSGD", "ZOAdam"])
def test_lazy_update_equals_eager_under_data_parallel_and_fsdp(ranks, name, how):
    """lazy_update=True with the process-group comm (and FSDP2 shards): bit for bit the eager
    data-parallel run, ranks identical; a forward outside a step (with FSDP2: before its
    all-gather) sees the updated weights."""
    eager = ranks[0][f"dp/{name}"]
    for r in ranks:
        lazy = r[f"lazy-{how}/{name}"]
        assert lazy["pending"] and lazy["flushed"] and lazy["deferred"] == STEPS
        assert lazy["flushes"] == 2  # the replica check at step 4, the forward at the end
        assert lazy["losses"] == eager["losses"]
        for k, w in eager["weights"].items():
            assert torch.equal(lazy["weights"][k], w), k
    model = make_net()
    model.load_state_dict(eager["weights"])
    with torch.no_grad():
        want = model(global_batch()[0])
    torch.testing.assert_close(ranks[0][f"lazy-{how}/{name}"]["out"], want, rtol=1e-6, atol=1e-6)


def test_launch_and_context(ranks):
    r0, r1 = ranks
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["backend"]) == (0, 1, 2, "gloo")
    assert r0["broadcast"] == r1["broadcast"] == {"secret": 42}
    assert r0["rows"] == [0, 1, 2, 3] and r1["rows"] == [4, 5, 6, 7]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_data_parallel_ranks_bit_identical(ranks, name):
    w0, w1 = ranks[0][f"dp/{name}"]["weights"], ranks[1][f"dp/{name}"]["weights"]
    start = full_weights(make_net())
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        assert not torch.equal(w0[k], start[k]), f"{k} did not move"
    assert ranks[0][f"dp/{name}"]["losses"] == ranks[1][f"dp/{name}"]["losses"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_data_parallel_equals_single_process_on_union(ranks, name):
    """Each rank averages its half; the all-reduced mean is the mean over the whole batch.

    The only differences are fp32 roundings: two half-batch means averaged in fp64 vs one mean
    over 8 examples (measured: losses differ by <= 7e-7 relative). The projected gradient
    (L+ - L-)/(2 eps) amplifies that by 1/eps = 1e3, so after 6 steps the weights differ by
    <= 7e-5 of the distance they travelled (measured). Tolerances: losses rtol 1e-5, weights
    1e-3 of the distance travelled; a wrong seed, a sum instead of a mean, or a rank using
    only its own loss gives differences of order 1.
    """
    dp = ranks[0][f"dp/{name}"]
    ref_w, ref_losses = single_process(name)
    torch.testing.assert_close(torch.tensor(dp["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    start = full_weights(make_net())
    travelled = max((ref_w[k] - start[k]).abs().max().item() for k in ref_w)
    worst = max((dp["weights"][k] - ref_w[k]).abs().max().item() for k in ref_w)
    assert travelled > 1e-3
    assert worst <= 1e-3 * travelled, (worst, travelled)


def test_loss_all_reduce_is_the_only_traffic(ranks):
    """ZO-SGD sends 2 fp64 loss scalars (16 bytes) per step in one all-reduce; the replica check
    every CHECK_EVERY steps sends [c, -c] for the 2-word header and 2 words per parameter."""
    comm = ranks[0]["dp/ZOSGD"]["comm"]
    n_params = len(list(make_net().parameters()))
    assert comm["loss_all_reduce"] == (STEPS, STEPS * 16)
    checks = STEPS // CHECK_EVERY
    assert comm["replica_check"] == (2 * checks, checks * (2 * 2 * 8 + 2 * 2 * n_params * 8))
    assert set(comm) == {"loss_all_reduce", "replica_check"}


def test_divergence_detected_on_every_rank(ranks):
    for r in ranks:
        div = r["divergence"]
        assert div is not None, f"rank {r['rank']}: perturbed replica not detected"
        assert div["step"] == STEPS + CHECK_EVERY
        assert "replicas diverged at step 8" in div["message"]
        assert "1 of 7 parameters" in div["message"] and "parameter index 3 (shape (7, 7)" in div["message"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_sharded_equals_unsharded(ranks, name):
    """FSDP2 gathers exactly the unsharded weights for the forwards and perturbs each shard with
    the rows of the full noise, so it reproduces the plain data-parallel run bit for bit (same
    rank batches, same losses). ZOSGD uses fully_shard_for_zo + a parameter list, ZOAdam plain
    fully_shard + an optimizer built from the module (the engine calls prepare_module); the
    replica check ran every step without a false alarm on the (different) shards."""
    shapes = [ranks[0][f"fsdp/{name}/local_shapes"], ranks[1][f"fsdp/{name}/local_shapes"]]
    assert shapes[0][:3] == [(2,), (4, 6), (4,)]  # scale, layers.0.weight and .bias: 2 + 1, 4 + 3, 4 + 3 rows
    assert shapes[1][:3] == [(1,), (3, 6), (3,)]
    for r in ranks:
        fsdp, dp = r[f"fsdp/{name}"], r[f"dp/{name}"]
        assert fsdp["losses"] == dp["losses"]
        for k, w in dp["weights"].items():
            assert torch.equal(fsdp["weights"][k], w), k
        assert fsdp["comm"]["replica_check"][0] == STEPS  # header only: shards are never compared


def test_hsdp_replicas_compared_across_replicate_dimension(ranks):
    """HSDP (2 replicas x 1 shard): same trajectory as plain data parallelism, the check compares
    every parameter across the replicate dimension each step and catches a perturbed replica."""
    assert ranks[0]["hsdp/placements"] == "(Replicate(), Shard(dim=0))"
    n_params = len(list(make_net().parameters()))
    for r in ranks:
        hsdp, dp = r["hsdp/ZOSGD"], r["dp/ZOSGD"]
        assert hsdp["losses"] == dp["losses"]
        for k, w in dp["weights"].items():
            assert torch.equal(hsdp["weights"][k], w), k
        # per step: the header (2 words) and every parameter (2 words each), sent as [c, -c]
        assert hsdp["comm"]["replica_check"] == (2 * STEPS, STEPS * (2 * 2 + 2 * 2 * n_params) * 8)
        msg = r["hsdp/divergence"]
        assert msg is not None and "replicas diverged at step 7: 1 of 7 parameters" in msg
        assert "across the replicate dimension 'replicate' of the device mesh: parameter index 6 (shape (3,)" in msg


def _check_fault(res: dict) -> None:
    assert res["type"] == "DistributedError" and res["is_distributed_error"], res
    assert "all-reduce of 2 loss scalar(s) (ZOSGD step 0) failed on rank 0 of 2" in res["message"]
    assert "Another rank has probably died" in res["message"] and "timeout_s" in res["message"]
    assert res["restored"], "parameters not restored after the failed step"


def test_hung_rank_times_out_with_clear_error(ranks):
    res = ranks[0]["hang"]
    _check_fault(res)
    assert f"within {HANG_TIMEOUT_S:g} s" in res["message"]
    assert HANG_TIMEOUT_S - 0.5 <= res["seconds"] <= HANG_TIMEOUT_S + 5, res["seconds"]


def test_dead_rank_gives_clear_error(ranks):
    res = ranks[0]["dies"]
    _check_fault(res)
    assert res["seconds"] <= MAIN_TIMEOUT_S + 5, res["seconds"]


def test_bench_scale_counts_bytes(ranks):
    rows = {r["optimizer"]: r for r in ranks[0]["bench"]}
    assert rows["ZOSGD"]["nproc"] == 2
    assert rows["ZOSGD"]["bytes_per_step"] == 16 and rows["ZOSGD"]["collectives_per_step"] == 1
    # conservative: L(theta) 1 value, L(theta +- eps z) 2 values, then L(theta -+ lr g) 1 + 1
    assert rows["ZOSGDConservative"]["bytes_per_step"] == 40
    assert rows["ZOSGDConservative"]["collectives_per_step"] == 4
    assert all(r["examples_per_s"] > 0 for r in rows.values())


# ---------------------------------------------------------------------------- single-process units
def test_init_distributed_is_none_without_launcher(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() is None


def test_init_distributed_needs_master_address(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        init_distributed(backend="gloo")
    with pytest.raises(UserError, match="backend must be"):
        init_distributed(backend="mpi")


def test_shard_requires_divisible_batch():
    ctx = DistContext(
        rank=2,
        world_size=4,
        local_rank=2,
        group=None,
        device=torch.device("cpu"),
        backend="gloo",
        timeout_s=10.0,
        owns_group=False,
    )
    assert ctx.shard(list("abcdefgh")) == ["e", "f"]
    assert not ctx.is_main
    with pytest.raises(UserError, match="not divisible by the number of processes 4"):
        ctx.shard(list(range(10)))


def test_checksum_is_bitwise():
    a = torch.randn(1000, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    assert torch.equal(tensor_checksum(a), tensor_checksum(b))
    b[517] = torch.nextafter(b[517], torch.tensor(10.0))  # one ulp
    assert not torch.equal(tensor_checksum(a), tensor_checksum(b))
    c = a.clone()
    c[[3, 4]] = c[[4, 3]]  # a swap keeps the plain sum; the weighted one catches it
    ca, cc = tensor_checksum(a), tensor_checksum(c)
    assert ca[0] == cc[0] and ca[1] != cc[1]
    assert torch.equal(tensor_checksum(a.to(torch.bfloat16)), tensor_checksum(a.to(torch.bfloat16)))


def test_check_replicas_without_group_is_noop():
    model = make_net()
    opt = zo.create("ZOSGD", model.parameters(), lr=0.01)
    assert check_replicas(opt) == 0


def test_meta_parameters_refused():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"parameter 'scale' is on the meta device"):
        zo.create("ZOSGD", model, lr=0.01)
    opt = zo.create("ZOSGD", list(model.parameters()), lr=0.01)  # parameter list: refused at the first step
    with pytest.raises(ValueError, match=r"shape \(3,\) is on the meta device"):
        opt.step(lambda: torch.tensor(0.0))
    model.scale.requires_grad_(False)
    for p in model.layers.parameters():  # frozen offloaded weights are fine
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'head.weight'"):
        prepare_module(model)
    model.head.requires_grad_(False)
    assert prepare_module(model) is model


def test_accelerate_disk_offload_refused(tmp_path):
    """accelerate's dispatch_model with a 'disk' entry leaves those weights on meta."""
    from accelerate import dispatch_model

    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    model = dispatch_model(model, device_map={"0": "cpu", "2": "disk"}, main_device="cpu", offload_dir=str(tmp_path))
    assert model[2].weight.device.type == "meta" and model[0].weight.device.type == "cpu"
    with pytest.raises(ValueError, match=r"'2.weight' is on the meta device"):
        zo.create("ZOSGD", model, lr=0.01)
    model[2].requires_grad_(False)  # only the on-device layer trains: allowed, and it works
    opt = zo.create("ZOSGD", model, lr=0.01)
    x = torch.randn(4, 6)
    before = model[0].weight.detach().clone()
    opt.step(lambda: model(x).square().mean())
    assert not torch.equal(model[0].weight, before)


def test_noise_device_placement_invariant():
    """Noise generated on another device and copied to the parameter's device gives the same
    trajectory: z is a function of (seed, parameter index, block) only. ``cpu:0`` is a distinct
    device for the engine (its own generator and block buffers, then the copy into the
    parameter-device buffer), which is the code path of parameters spread over several GPUs
    (device_map) that this CPU-only machine can run; 2 worker threads, so buffers are per
    (thread, device)."""
    a, b = make_net(), make_net()
    opt_a = zo.create("ZOAdam", a.parameters(), lr=1e-2, num_threads=1, **TRAIN_KW)
    opt_b = zo.create("ZOAdam", b.parameters(), lr=1e-2, noise_device="cpu:0", num_threads=2, **TRAIN_KW)
    train(a, opt_a, list(range(GLOBAL_BATCH)), steps=3)
    train(b, opt_b, list(range(GLOBAL_BATCH)), steps=3)
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), make_net().parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, p0)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
