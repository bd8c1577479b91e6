"""Method-specific tests of HiZOO, HiZOO-multi, HiZOO-L, ZO-AdaMU and HELENE.

The common tests (tests/test_optim_common.py) check every registered optimizer against its
oracle with its default options; here the options, the invariants the spec names
(alpha = 0 is MeZO, n = 1 is HiZOO, sign-normalised warm-up, anneal values), memory, pass
counts and a statistical check of HiZOO's estimator.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zotune.optim as zo
from zotune.optim.noise import full_noise, mix_seed
from zotune.optim.reference_methods import RefHELENE, RefHiZOO, RefHiZOOLowRank, RefZOAdaMU
from zotune.optim.zo_adamu import anneal

MINE = ["HiZOO", "HiZOOLowRank", "ZOAdaMU", "HELENE"]


def make_problem(dtype: torch.dtype = torch.float64, seed: int = 0):
    """A small regression MLP (matrices and biases) and its loss closure."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 1)).to(dtype)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(99)).to(dtype)
    y = torch.sin(x.sum(1, keepdim=True))

    def closure():
        return ((model(x) - y) ** 2).mean()

    return model, closure


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_matches_oracle(name: str, ref_cls, steps: int = 6, ref_only: dict | None = None,
                          **kw) -> zo.ZOOptimizer:
    """Fast optimizer == oracle step by step in float64 (rounding-level tolerance, see common tests).

    eps = 1e-2: HiZOO's second difference divides loss roundings by 2 eps^2, and 1/sqrt(h)
    amplifies them where h is small; at eps = 1e-2 they stay far below the 1e-9 tolerance.
    """
    fast_model, fast_closure = make_problem()
    ref_model, ref_closure = make_problem()
    start = weights(fast_model)
    kw = dict(kw, eps=1e-2, seed=5)
    fast = zo.create(name, fast_model.parameters(), block_size=16, num_threads=2, **kw)
    ref = ref_cls(list(ref_model.parameters()), block_size=16, **kw, **(ref_only or {}))
    for _ in range(steps):
        fast.step(fast_closure)
        ref.step(ref_closure)
        for a, b in zip(fast_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(start, fast_model.parameters()))
    return fast


# ---------------------------------------------------------------------- HiZOO
@pytest.mark.parametrize("name", ["HiZOO", "HiZOOLowRank"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_zero_is_zosgd_bit_for_bit(name, dtype):
    runs = []
    for cls_name, extra in [("ZOSGD", {}), (name, {"alpha": 0.0})]:
        model, _ = make_problem(dtype=torch.float32)
        model = model.to(dtype)
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
        opt = zo.create(cls_name, model, lr=1e-2, weight_decay=0.1, seed=11, block_size=16, num_threads=2, **extra)
        for _ in range(5):
            opt.step(lambda: model(x).float().pow(2).mean())  # noqa: B023
        runs.append((weights(model), opt))
    (a, _), (b, hizoo) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for st in hizoo.state.values():
        for key in ("hessian", "row", "col"):
            if key in st:
                init = 1.0 if key == "hessian" else st[key][0].item()  # R = n 1, C = m 1
                assert torch.all(st[key] == init), key


HIZOO_OPTIONS = [
    dict(trace_correction=True),
    dict(trace_correction=True, abs_after_ema=True),
    dict(abs_after_ema=True, h_min=0.5),
    dict(h_min=0.9, h_max=1.5, weight_decay=0.05),
    dict(warmup_probes=3),
    dict(warmup_probes=2, trace_correction=True, abs_after_ema=True),
    dict(alpha_schedule="harmonic"),
    dict(alpha_schedule="linear", alpha_decay_steps=4),
    dict(n_samples=3),
    dict(n_samples=2, trace_correction=True, abs_after_ema=True, h_max=3.0),
]


@pytest.mark.parametrize("options", HIZOO_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_hizoo_options_match_oracle(options):
    opt = assert_matches_oracle("HiZOO", RefHiZOO, lr=1e-2, alpha=0.2, **options)
    assert opt.zo_state["forwards"] == 6 * (2 * opt.n_samples + 1) + 2 * opt.warmup_probes


@pytest.mark.parametrize("options", [dict(hessian_every=3), dict(hessian_every=2, n_samples=2, warmup_probes=2,
                                                                     trace_correction=True, abs_after_ema=True)],
                         ids=["every3", "every2-multi-warm"])
def test_hizoo_lazy_hessian_matches_oracle(options):
    """hessian_every = k: h refreshed on updates 0, k, 2k, ... (2n + 1 forwards), else 2n forwards."""
    opt = assert_matches_oracle("HiZOO", RefHiZOO, steps=7, lr=1e-2, alpha=0.2, **options)
    k, n = opt.hessian_every, opt.n_samples
    refreshes = len(range(0, 7, k))
    assert opt.zo_state["forwards"] == 7 * 2 * n + refreshes + 2 * opt.warmup_probes


def test_hizoo_lazy_hessian_keeps_h_between_refreshes():
    model, closure = make_problem(dtype=torch.float32)
    opt = zo.HiZOO(model, lr=1e-2, eps=1e-2, alpha=0.5, hessian_every=2, seed=3)
    snapshots = []
    for _ in range(4):
        opt.step(closure)
        snapshots.append(torch.cat([st["hessian"].view(-1) for st in opt.state.values()]).clone())
    assert not torch.equal(snapshots[0], torch.ones_like(snapshots[0]))  # update 0 refreshed h
    assert torch.equal(snapshots[0], snapshots[1])  # update 1 kept it
    assert not torch.equal(snapshots[1], snapshots[2])  # update 2 refreshed it again
    assert torch.equal(snapshots[2], snapshots[3])


def test_hizoo_clamp_binds_and_h_changes():
    opt = assert_matches_oracle("HiZOO", RefHiZOO, lr=1e-2, alpha=0.2, h_min=0.9, h_max=1.5)
    h = torch.cat([st["hessian"].view(-1) for st in opt.state.values()])
    assert h.max() == 1.5 and h.min() >= 0.9 and not torch.all(h == 1.5)


@pytest.mark.parametrize("options", [{}, {"trace_correction": True}])
def test_hizoo_multi_with_one_sample_is_hizoo(options):
    """The n-sample formulas of spec 2.10 (oracle, forced) with n = 1 == the fast HiZOO."""
    assert_matches_oracle("HiZOO", RefHiZOO, lr=1e-2, alpha=0.2, n_samples=1, ref_only={"multi_formula": True},
                          **options)


def test_hizoo_variance_of_gradient_drops_with_n_samples():
    """HiZOO-multi averages n directions: the update's spread shrinks (~1/sqrt(n))."""
    spread = {}
    for n in (1, 8):
        moves = []
        for seed in range(12):
            w = nn.Parameter(torch.ones(20, dtype=torch.float64))
            opt = zo.HiZOO([w], lr=1e-2, alpha=0.0, n_samples=n, seed=seed)
            opt.step(lambda: 0.5 * (w * w).sum())  # noqa: B023
            moves.append(w.detach() - 1.0)
        m = torch.stack(moves)
        spread[n] = (m - m.mean(0)).pow(2).mean().sqrt().item()
    assert spread[8] < 0.6 * spread[1]


def _est_variance(h: torch.Tensor, trace: bool) -> torch.Tensor:
    """Var of the single-sample estimate at theta fixed, h = 1, f = 1/2 sum H_j x_j^2.

    est_i = 1/2 (z_i^2 - k) sum_j H_j z_j^2 with k = 1 (trace-corrected) or 0; Gaussian
    moments E z^2, z^4, z^6, z^8 = 1, 3, 15, 105; R = sum_{j != i} H_j z_j^2.
    """
    s, q = h.sum(), (h * h).sum()
    r_mean, r_var = s - h, 2 * (q - h * h)
    r2 = r_var + r_mean**2
    if trace:  # E(z^2-1)^2 = 2, E(z^2-1)^2 z^2 = 10, E(z^2-1)^2 z^4 = 78; mean H_i
        second = 0.25 * (78 * h * h + 2 * 10 * h * r_mean + 2 * r2)
        mean = h
    else:  # E z^8 = 105, z^6 = 15, z^4 = 3; mean (S + 2 H_i) / 2
        second = 0.25 * (105 * h * h + 2 * 15 * h * r_mean + 3 * r2)
        mean = 0.5 * (s + 2 * h)
    return second - mean**2


@pytest.mark.parametrize("trace", [True, False])
def test_hizoo_estimator_mean_on_diagonal_quadratic(trace):
    """At lr = 0 and alpha = 0 (h = 1, theta fixed) the per-step pre-EMA, pre-|.| estimate has mean
    H_ii with trace_correction (spec: E[diag Sigma'] = H) and (tr H + 2 H_ii)/2 without it.

    Each step averages k = 16 independent directions (HiZOO-multi; given theta the k second
    differences are independent, so the variance is Var / k). Tolerance: 4 standard errors
    from the exact variance (_est_variance) over N k samples, per coordinate; the two targets
    differ by > 8 standard errors, so each estimator would fail the other's check.
    """
    H = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    x = nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    k, n = 16, 160
    opt = zo.HiZOO([x], lr=0.0, alpha=0.0, trace_correction=trace, n_samples=k, seed=2024, exact_restore=True)
    total, total_sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)

    def hook(block, est):
        nonlocal total, total_sq
        total = total + est.view(-1)
        total_sq = total_sq + est.view(-1) ** 2

    opt.estimate_hook = hook
    for _ in range(n):
        opt.step(lambda: 0.5 * (H * x * x).sum())
    mean = total / n
    var = _est_variance(H, trace) / k
    target = H if trace else 0.5 * (H.sum() + 2 * H)
    other = 0.5 * (H.sum() + 2 * H) if trace else H
    se = (var / n).sqrt()
    assert torch.all((mean - target).abs() <= 4 * se), (mean, target, se)
    assert torch.all((other - target).abs() > 8 * se)  # the test can tell the two estimators apart
    empirical = total_sq / n - mean**2
    # sanity check of the derivation (a sample variance of a heavy-tailed estimate from 160 values
    # is itself noisy, so only a factor of 2): a wrong formula would be off by a lot more
    assert torch.all((empirical / var > 0.5) & (empirical / var < 2.0)), (empirical, var)
    assert torch.equal(x.detach(), torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))


def test_hizoo_memory_is_exactly_one_fp32_buffer():
    model, closure = make_problem(dtype=torch.float32)
    opt = zo.HiZOO(model, lr=1e-3, alpha=1e-2, n_samples=2, warmup_probes=2)
    opt.step(closure)
    numel = sum(p.numel() for p in model.parameters())
    tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    assert sum(t.numel() * t.element_size() for t in tensors) == 4 * numel
    assert all(t.dtype == torch.float32 for t in tensors)
    assert opt.state_buffers == ("hessian",)


def test_hizoo_validates_arguments():
    w = [nn.Parameter(torch.ones(2))]
    for bad in [dict(alpha=1.0), dict(alpha=-0.1), dict(n_samples=0), dict(warmup_probes=-1),
                dict(h_min=-1.0), dict(h_min=2.0, h_max=1.0), dict(alpha_schedule="cosine"),
                dict(alpha_schedule="linear"), dict(hessian_every=0), dict(hessian_every=1.5)]:
        with pytest.raises(ValueError):
            zo.HiZOO(w, **bad)


# ---------------------------------------------------------------------- HiZOO-L
@pytest.mark.parametrize("options", [{}, dict(trace_correction=True), dict(h_min=0.8, h_max=1.3),
                                     dict(alpha_schedule="harmonic", weight_decay=0.1)], ids=str)
def test_hizoo_lowrank_options_match_oracle(options):
    opt = assert_matches_oracle("HiZOOLowRank", RefHiZOOLowRank, lr=1e-2, alpha=0.2, **options)
    for st in opt.state.values():
        if "row" in st:  # both factors sum the same |est|: sum(R) = sum(C) is preserved
            assert math.isclose(st["row"].sum().item(), st["col"].sum().item(), rel_tol=1e-9)
            assert math.isclose(st["row_total"], st["row"].sum().item(), rel_tol=1e-12)


def test_hizoo_lowrank_on_vectors_is_hizoo():
    """1-D tensors keep a full h: on a vector HiZOO-L is HiZOO, bit for bit."""
    runs = []
    for name in ("HiZOO", "HiZOOLowRank"):
        w = nn.Parameter(torch.linspace(-1, 1, 40))
        opt = zo.create(name, [w], lr=1e-2, alpha=0.3, trace_correction=True, seed=3, block_size=8)
        for _ in range(4):
            opt.step(lambda: (torch.arange(40.0) * w * w).sum())  # noqa: B023
        runs.append(w.detach().clone())
    assert torch.equal(*runs)


def test_hizoo_lowrank_memory_on_transformer_is_under_5_percent():
    from zotune.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", hidden_size=128)
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = zo.HiZOOLowRank(model, lr=1e-6, alpha=1e-4)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v))
    assert state_bytes <= 0.05 * 4 * numel, state_bytes / (4 * numel)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert all("row" in opt.state[p] and "hessian" not in opt.state[p] for p in matrices)
    hizoo = zo.HiZOO(model, lr=1e-6)
    hizoo.step(lambda: model(input_ids=ids, labels=ids).loss)
    full = sum(v.numel() * v.element_size() for st in hizoo.state.values() for v in st.values()
               if torch.is_tensor(v))
    assert full == 4 * numel and state_bytes < full / 20


def test_hizoo_lowrank_rejects_unsupported_options():
    with pytest.raises(ValueError, match="n_samples"):
        zo.HiZOOLowRank([nn.Parameter(torch.ones(2, 2))], n_samples=2)
    with pytest.raises(ValueError, match="hessian_every"):
        zo.HiZOOLowRank([nn.Parameter(torch.ones(2, 2))], hessian_every=2)


# ---------------------------------------------------------------------- pass counts
@pytest.mark.parametrize(("name", "kw", "passes"), [
    ("ZOSGD", {}, 3),
    ("HiZOO", {}, 3),
    ("HiZOO", {"n_samples": 3}, 3 * 3),  # 2 displacements + 1 restore/update per direction
    ("HiZOOLowRank", {}, 4),  # + the row/column-sum pass
    ("ZOAdaMU", {}, 3),
    ("HELENE", {}, 3),
])
def test_regeneration_passes_per_step(name, kw, passes, monkeypatch):
    w = nn.Parameter(torch.ones(4, 3))
    opt = zo.create(name, [w], lr=1e-3, **kw)
    opt.step(lambda: (w * w).sum())  # the first step may differ (warm-up); count the second
    calls = {"sweeps": 0, "noise": 0}
    original = opt._sweep

    def counting(seeds, kernel):
        calls["sweeps"] += 1
        calls["noise"] += len(seeds)
        return original(seeds, kernel)

    monkeypatch.setattr(opt, "_sweep", counting)
    opt.step(lambda: (w * w).sum())
    assert calls["sweeps"] == passes
    assert opt.zo_state["forwards"] == 2 * opt.forwards_per_step


# ---------------------------------------------------------------------- ZO-AdaMU
def test_adamu_anneal_matches_the_spec_values():
    """Spec 2.7, T = 20K, T1 = 1024, T2 = 16K: alpha 1 -> 0.90 -> 0.48 -> 0.010 (+-0.01), etc."""
    opt = zo.ZOAdaMU([nn.Parameter(torch.ones(1))], total_steps=20000)
    expected = {  # t: (alpha, beta1, beta2)
        5000: (0.90, 0.90, 0.89),
        10000: (0.48, 0.57, 0.43),
        16000: (0.010, 0.131, 0.012),
        19999: (0.010, 0.131, 0.012),
    }
    for t, values in expected.items():
        got = opt.coefficients(t - 1)  # coefficients() takes the 0-based update index
        assert all(abs(g - v) <= 0.01 for g, v in zip(got, values)), (t, got)
    assert opt.coefficients(0) == (1.0, 1.0, 1.0) and opt.coefficients(1022) == (1.0, 1.0, 1.0)
    assert anneal(1024, 0.1, 1024, 16000, 20000) == 1.0  # continuous at T1
    paper = zo.ZOAdaMU([nn.Parameter(torch.ones(1))], total_steps=20000, phase3="paper")
    assert paper.coefficients(16500) == (0.5, 0.9, 0.01)
    assert paper.coefficients(10000) == opt.coefficients(10000)


@pytest.mark.parametrize("sigma", [0.0, 1e-8])
def test_adamu_warmup_is_sign_normalised_step(sigma):
    """alpha = beta1 = beta2 = 1 (the warm-up phase): theta -= lr g z1 / sqrt(z1^2 + sigma) = lr g sign(z1)."""
    w = nn.Parameter(torch.linspace(-1.0, 1.0, 30, dtype=torch.float64))
    opt = zo.ZOAdaMU([w], lr=1e-2, sigma=sigma, seed=4)
    for step in range(3):
        before = w.detach().clone()
        opt.step(lambda: (torch.arange(30.0, dtype=torch.float64) * w * w).sum())
        g = opt.zo_state["last_projected_grads"][0]
        z1 = full_noise(mix_seed(4, step, 0), 0, w.shape, stream=0).double()
        expected = before - 1e-2 * g * (torch.sign(z1) if sigma == 0 else z1 / (z1 * z1 + sigma).sqrt())
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
        assert opt.zo_state["last_coefficients"] == [1.0, 1.0, 1.0]
        assert torch.equal(opt.state[w]["momentum"], z1)  # m_t = zd = z1
    assert (w.detach() - before).abs().sub(1e-2 * abs(g)).abs().max() < 1e-6  # all coordinates move lr|g|


@pytest.mark.parametrize("options", [dict(fixed=(0.5, 0.3, 0.7)), dict(fixed=(0.2, 0.9, 0.1), weight_decay=0.1),
                                     dict(total_steps=8, t1=1, phase3="paper"), dict(total_steps=8, t1=2, t2=4)],
                         ids=str)
def test_adamu_options_match_oracle(options):
    """Mixed momentum/noise: m_{t-1} must be read by the perturbations and only then overwritten."""
    assert_matches_oracle("ZOAdaMU", RefZOAdaMU, lr=1e-3, **options)


def test_adamu_validates_arguments():
    w = [nn.Parameter(torch.ones(2))]
    for bad in [dict(t1=100, total_steps=100), dict(phase3="x"), dict(sigma=-1.0), dict(fixed=(2.0, 1.0, 1.0)),
                dict(phi=(1.0, 1.0, 6.0))]:
        with pytest.raises(ValueError):
            zo.ZOAdaMU(w, **bad)


# ---------------------------------------------------------------------- HELENE
def test_helene_is_marked_experimental():
    assert zo.HELENE.__doc__.lstrip().startswith("EXPERIMENTAL")
    assert "EXPERIMENTAL" in zo.HELENE.summary
    assert zo.HELENE.state_buffers == ("momentum", "hessian")


@pytest.mark.parametrize("options", [dict(momentum_form="ema"), dict(clip="sophia", clip_threshold=0.5, gamma=0.1),
                                     dict(gnb_scale=16.0, hessian_interval=1, clip_threshold=0.01),
                                     dict(weight_decay=0.1, anneal_steps=2.0)], ids=str)
def test_helene_options_match_oracle(options):
    assert_matches_oracle("HELENE", RefHELENE, lr=1e-3, **options)


def test_helene_decreases_a_quadratic():
    d = torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    w = nn.Parameter(1.0 / d.sqrt())
    opt = zo.HELENE([w], lr=1e-3, seed=0)
    f0 = 0.5 * float((d * w.detach() ** 2).sum())
    for _ in range(300):
        opt.step(lambda: 0.5 * (d * w * w).sum())
    f = 0.5 * float((d * w.detach() ** 2).sum())
    assert math.isfinite(f) and f < 0.5 * f0


# ---------------------------------------------------------------------- every method
#: lr per method from one rule, not tuned: SGD-like methods 1 / ((d + 2) max D) (stable for
#: ZO-SGD), heavy-ball momentum (1 - beta) times that (its steady-state step is lr / (1 - beta)),
#: methods whose step is normalised per coordinate 1% of the smallest initial |x_i|.
def _quadratic_lr(name: str, d: int, max_d: float) -> float:
    if name in {"ZOSGDSign", "ZOAdam", "ZOAdaMU"}:
        return 1e-2 / math.sqrt(max_d)
    sgd = 1.0 / ((d + 2) * max_d)
    return 0.1 * sgd if name == "ZOSGDMomentum" else sgd


@pytest.mark.parametrize("name", zo.available())
def test_every_method_decreases_a_convex_quadratic(name):
    diag = torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    w = nn.Parameter(1.0 / diag.sqrt())
    # Sparse-MeZO moves only the weights at or below its threshold; here each of the 4 carries a
    # quarter of the loss, so its default (the smallest weight) cannot halve it: threshold = max |w|
    extra = {"sparsity": 0.0} if name == "SparseMeZO" else {}
    if name == "ZOMuon":
        extra = {"vector_lr_scale": 1.0}  # w is a vector: ZO-Muon's vector rule
    opt = zo.create(name, [w], lr=_quadratic_lr(name, 4, 10.0), seed=1, **extra)
    f0 = 0.5 * float((diag * w.detach() ** 2).sum())
    for _ in range(300):
        opt.step(lambda: 0.5 * (diag * w * w).sum())
    f = 0.5 * float((diag * w.detach() ** 2).sum())
    assert f < 0.5 * f0, (name, f / f0)


@pytest.mark.parametrize("name", MINE)
def test_registered_with_aliases_summary_and_accounting(name):
    cls = zo.get(name)
    assert cls.__name__ == name and cls.summary and cls.aliases
    assert all(zo.get(alias) is cls for alias in cls.aliases)
    w = nn.Parameter(torch.ones(3, 2))
    opt = cls([w], lr=1e-3)
    opt.step(lambda: (w * w).sum())
    for buffer in cls.state_buffers:  # every declared d-sized buffer exists with the parameter's shape
        assert opt.state[w][buffer].shape == w.shape and opt.state[w][buffer].dtype == torch.float32


# ---------------------------------------------------------------------- the quadratic benchmark
def test_quadratic_bench_smoke(tmp_path):
    import argparse

    from zotune.bench import quadratic

    parser = argparse.ArgumentParser()
    quadratic.add_arguments(parser)
    args = parser.parse_args(["--dims", "2", "--conds", "4", "--seeds", "3", "--max-steps", "80",
                              "--alphas", "0.1", "--optimizers", "zo-sgd", "hizoo", "--rows", "zosgd", "published",
                              "--json", str(tmp_path / "q.json"), "--markdown", str(tmp_path / "q.md")])
    assert quadratic.run(args) == 0
    import json

    results = json.loads((tmp_path / "q.json").read_text())["results"]
    assert {r["row"] for r in results} == {"ZOSGD", "HiZOO (published)"}
    for r in results:
        assert r["reached"] >= 2 and r["median_steps"] <= 80  # an easy problem: both reach it
        fps = 3 if r["method"] == "HiZOO" else 2
        assert r["median_forwards"] == pytest.approx(fps * r["median_steps"])
    assert "HiZOO (published)" in (tmp_path / "q.md").read_text()
