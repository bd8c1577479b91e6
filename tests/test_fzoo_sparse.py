"""FZOO and Sparse-MeZO: their own statistical and structural checks (oracle equality and the
rest of the common suite are in test_optim_common.py). Fixed seeds, stated tolerances."""

from __future__ import annotations

import pytest
import torch

import zotune.optim as zo


def linear_problem(d: int = 20, seed: int = 0):
    """L(x) = g.x in float64: the SPSA/FZOO differences are exact along any direction."""
    g = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    return g, x, lambda: (g * x).sum()


# ---------------------------------------------------------------------- FZOO
def test_fzoo_step_does_not_depend_on_eps_or_the_gradient_scale():
    """(l_i - l0) / sigma is invariant to eps and to |g| on a linear loss: equal steps up to the
    engine's fp32 rounding of each loss (relative 6e-8, amplified by the ratio; rtol 1e-5)."""
    steps = []
    for eps, scale in [(1e-3, 1.0), (1e-2, 1.0), (1e-3, 50.0)]:
        g, x, _ = linear_problem()
        opt = zo.FZOO([x], lr=0.1, eps=eps, n_queries=8, seed=3)
        opt.step(lambda g=g, x=x, scale=scale: scale * (g * x).sum())
        steps.append(x.detach().clone())
    for other in steps[1:]:
        torch.testing.assert_close(other, steps[0], rtol=1e-5, atol=1e-8)  # steps are ~0.03


def test_fzoo_mean_step_points_down_the_gradient():
    """Mean of 300 steps on L = g.x (d = 20, N = 8, seed 0): one step's cosine with -g is about
    sqrt(N/d) ~ 0.6 with spread; the mean over 300 steps is expected above 0.98. Tolerance 0.9.
    Each step has norm about lr sqrt(d/N) (N terms (l_i - l0)/(N sigma) of size ~1/N along
    vectors of norm sqrt(d)), whatever |g| and eps are; checked within a factor 2."""
    g, x, closure = linear_problem()
    lr = 1e-3
    opt = zo.FZOO([x], lr=lr, eps=1e-3, n_queries=8, seed=0)
    norms = []
    for _ in range(300):
        before = x.detach().clone()
        opt.step(closure)
        norms.append(float((x.detach() - before).norm()))
    cos = torch.nn.functional.cosine_similarity(x.detach(), -g, dim=0)
    assert float(cos) > 0.9
    mean_norm = sum(norms) / len(norms)
    assert lr * (20 / 8) ** 0.5 / 2 < mean_norm < 2 * lr * (20 / 8) ** 0.5
    assert opt.zo_state["forwards"] == 300 * 9 == 300 * opt.forwards_per_step


def test_fzoo_equal_losses_take_no_step_and_bad_n_is_refused():
    x = torch.nn.Parameter(torch.ones(4))
    opt = zo.FZOO([x], lr=1.0, n_queries=4)
    opt.step(lambda: torch.tensor(2.0))  # flat: sigma = 0
    assert torch.equal(x.detach(), torch.ones(4)) and opt.zo_state["updates"] == 1
    assert opt.zo_state["last_projected_grads"] == [0.0] * 4
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="n_queries"):
            zo.FZOO([x], n_queries=bad)


# ---------------------------------------------------------------------- Sparse-MeZO
def spread_weights(d: int = 40) -> torch.nn.Parameter:
    """|theta| = 0.1, 0.2, ..., 4.0 in a shuffled order with random signs: far from any threshold."""
    gen = torch.Generator().manual_seed(1)
    values = torch.arange(1, d + 1, dtype=torch.float64) / 10
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return torch.nn.Parameter((values * signs)[torch.randperm(d, generator=gen)])


def test_sparse_mezo_moves_only_the_small_weights():
    x = spread_weights()
    small = x.detach().abs() <= 1.0  # sparsity 0.75 of 40: the 10 smallest, |theta| <= 1.0
    g = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt = zo.SparseMeZO([x], lr=1e-3, eps=1e-3, sparsity=0.75, seed=0)
    start = x.detach().clone()
    for _ in range(5):
        opt.step(lambda: (g * x).sum())
    moved = x.detach() != start
    assert moved.any() and not (moved & ~small).any()
    assert float(opt.state[x]["threshold"]) == pytest.approx(1.0)


def test_sparse_mezo_expected_update_is_the_masked_gradient():
    """On L = g.x, E[step] = -lr m*g (m: the mask). 1000 steps at lr 1e-6, seed 0. The weight at
    the threshold itself (|theta| = 1.0) drifts by roundings of the in-place perturbation and
    may leave the mask, so it is not compared; every other weight is >= 0.1 from the threshold
    and moves < 1e-3. The relative error of the mean step has an sd of about
    sqrt(|m| / steps) = 0.1; tolerance 0.35."""
    x = spread_weights()
    mask = (x.detach().abs() < 0.95).to(torch.float64)
    compared = x.detach().abs() != 1.0
    g = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lr, steps = 1e-6, 1000
    opt = zo.SparseMeZO([x], lr=lr, eps=1e-3, sparsity=0.75, seed=0)
    start = x.detach().clone()
    for _ in range(steps):
        opt.step(lambda: (g * x).sum())
    mean = (x.detach() - start) / (lr * steps)
    expected = -mask * g
    assert float((mean - expected)[compared].norm() / expected.norm()) < 0.35
    assert float(mean[(mask == 0) & compared].abs().max()) == 0.0


def test_sparse_mezo_keeps_moving_a_zero_initialised_tensor():
    # LoRA's B starts at zero: a threshold of 0 would let every weight leave the mask at its
    # first update and freeze the tensor; with no magnitudes to select by, it is perturbed whole
    b = torch.nn.Parameter(torch.zeros(12, dtype=torch.float64))
    half = torch.nn.Parameter(torch.cat([torch.zeros(8), torch.linspace(1, 2, 4)]).double())
    g = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt = zo.SparseMeZO([b, half], lr=1e-2, eps=1e-3, sparsity=0.5, seed=0)
    opt.step(lambda: (g * b).sum() + (g * half).sum())
    after_first = [b.detach().clone(), half.detach().clone()]
    for _ in range(3):
        opt.step(lambda: (g * b).sum() + (g * half).sum())
    assert (b.detach() != after_first[0]).all()  # still moving after the first update
    assert (half.detach() != after_first[1]).all()  # 8 of 12 zeros: no magnitudes either
    assert torch.isinf(opt.state[b]["threshold"]) and torch.isinf(opt.state[half]["threshold"])
    x = spread_weights()  # a tensor with magnitudes keeps its finite quantile
    opt = zo.SparseMeZO([x], lr=1e-3, sparsity=0.75)
    opt.step(lambda: x.sum())
    assert float(opt.state[x]["threshold"]) == pytest.approx(1.0)


def test_sparse_mezo_masks_are_dropped_after_each_step_and_sparsity_is_checked():
    x = spread_weights()
    opt = zo.SparseMeZO([x], lr=1e-3, sparsity=0.5)
    opt.step(lambda: x.sum())
    assert opt._masks == {}
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="sparsity"):
            zo.SparseMeZO([x], sparsity=bad)


# ---------------------------------------------------------------------- DiZO
def test_dizo_projection_finds_the_best_scale_of_each_matrix():
    """Two 3x4 matrices moved by d_i from theta0 (|d_i| = 0.5); L = sum_i 1/2 |theta_i - theta0_i
    - s*_i d_i|^2 with s* = (0.85, 1.1), inside the clip range (0.8, 1.2). The central difference
    is exact on a quadratic, so 40 iterations of the scale search (seed 0) reach s* up to the
    cross-talk of the shared loss; tolerance 0.05. A vector parameter is not projected."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64, generator=gen)) for _ in range(2)]
    vec = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=gen))
    theta0 = [m.detach().clone() for m in mats]
    moves = [torch.randn(3, 4, dtype=torch.float64, generator=gen) for _ in range(2)]
    moves = [0.5 * d / d.norm() for d in moves]
    target = (0.85, 1.1)

    def loss():
        return sum(0.5 * ((m - t0 - s * d) ** 2).sum() for m, t0, s, d in zip(mats, theta0, target, moves)) \
            + (vec**2).sum()

    opt = zo.DiZO([*mats, vec], lr=0.0, interval=1, projection_iters=40, seed=0)
    opt.step(loss)  # step 0: a ZO-SGD step (lr 0); the anchors are the weights at this step
    assert not opt.is_projection_step(0) and opt.is_projection_step(1)
    with torch.no_grad():
        for m, t0, d in zip(mats, theta0, moves):
            m.copy_(t0 + d)
    vec_before = vec.detach().clone()
    forwards = opt.zo_state["forwards"]
    opt.step(loss)
    assert opt.zo_state["forwards"] - forwards == 80
    for m, t0, d, s in zip(mats, theta0, moves, target):
        scale = float(((m.detach() - t0) * d).sum() / (d * d).sum())
        assert abs(scale - s) < 0.05, (scale, s)
        torch.testing.assert_close(m.detach() - t0, scale * d)  # only the length changed
    assert torch.equal(vec.detach(), vec_before)
    assert opt.forwards_per_step == (2 * 1 + 2 * 40) / 2


def test_dizo_forwards_per_step_and_arguments():
    w = torch.nn.Parameter(torch.ones(2, 2))
    assert zo.DiZO([w]).forwards_per_step == pytest.approx((2 * 50 + 2 * 10) / 51)
    for bad in (dict(interval=0), dict(projection_iters=0), dict(clip_range=0.5), dict(projection_eps=0.0)):
        with pytest.raises(ValueError):
            zo.DiZO([w], **bad)
