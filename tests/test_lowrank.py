"""LOZO, LOZO-M, SubZero and ZO-Muon: the maths of their matrix-structured directions.

The common behaviour (oracle equality, restore, NaN/exception safety, state dicts, thread
bit-identity, low precision) is in test_optim_common.py; here: what each estimator is in
expectation on a linear loss (where the finite differences are exact), the rank and the
refresh schedule of the factors, Newton-Schulz, pass counts and memory.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zotune.optim as zo
from zotune.optim.lowrank import gaussian, newton_schulz5, orthonormal

LOWRANK = ["LOZO", "LOZOM", "SubZero", "ZOMuon"]


def linear_target(m: int = 6, n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mean_step(name: str, target: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    """-(W_T - W_0) / (lr T) on L(W) = <target, W> (exact differences: c does not depend on W)."""
    w = nn.Parameter(torch.zeros_like(target))
    opt = zo.create(name, [w], lr=1.0, seed=5, **kw)
    for _ in range(steps):
        opt.step(lambda: (target * w).sum())
    return -w.detach() / steps


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------------- expected directions
def test_lozo_estimate_is_r_times_the_gradient_in_expectation():
    """E[c U V^T] = E[U V^T <G, U V^T>] = r G for Gaussian U, V (V fresh every step here).

    One sample's relative error is ~ sqrt(m n) = 5.5; over 4000 steps ~ 0.09, so 0.3 is ~3.5 sigma
    (fixed seed: the test is deterministic).
    """
    g = linear_target()
    est = mean_step("LOZO", g, 4000, rank=2, interval=1)
    assert cosine(est, g) > 0.95
    assert (est - 2 * g).norm() / (2 * g).norm() < 0.3


def test_lozo_with_lazy_v_stays_in_the_span_of_v():
    """Within one window every update is U_t V^T: the row space of the sum is V's columns (rank r)."""
    g = linear_target()
    w = nn.Parameter(torch.zeros_like(g))
    opt = zo.LOZO([w], lr=1.0, rank=2, interval=10, seed=1)
    for _ in range(10):
        opt.step(lambda: (g * w).sum())
    s = torch.linalg.svdvals(w.detach())
    assert s[1] > 1e-3 * s[0] and s[2] < 1e-10 * s[0]  # exactly rank 2 after 10 steps of one window
    opt.step(lambda: (g * w).sum())  # step 10 starts a new window: a new V
    s = torch.linalg.svdvals(w.detach())
    assert s[2] > 1e-6 * s[0]


def test_subzero_estimate_is_unbiased():
    """z = sqrt(mn)/r U Z V^T has E[vec z vec z^T] = I, so E[c z] = G (U, V fresh every step here)."""
    g = linear_target()
    est = mean_step("SubZero", g, 4000, rank=2, interval=1)
    assert cosine(est, g) > 0.95
    assert (est - g).norm() / g.norm() < 0.3


def test_subzero_direction_has_the_dense_norm_and_rank_r():
    g = linear_target(12, 9)
    w = nn.Parameter(torch.zeros_like(g))
    opt = zo.SubZero([w], lr=1.0, rank=3, interval=100, seed=2)
    opt.step(lambda: (g * w).sum())
    s = torch.linalg.svdvals(w.detach())
    assert s[2] > 1e-6 * s[0] and s[3] < 1e-10 * s[0]
    opt._prepare()
    opt._ensure_factors([opt._seed()])
    a, b = opt._factors[opt._seed()][0]
    norms = [float((a @ b).norm() ** 2)]
    for t in range(1, 400):  # E ||z||^2 = m n = 108 over fresh cores
        opt._ensure_factors([opt._seed(t)])
        a, b = opt._factors[opt._seed(t)][0]
        norms.append(float((a @ b).norm() ** 2))
    assert abs(sum(norms) / len(norms) / 108 - 1) < 0.15


def test_subspace_mezo_is_unbiased_up_to_r_over_m():
    """ZO-Muon without Newton-Schulz: E[P P^T G] = (r/m) G over Haar P (refreshed every step)."""
    g = linear_target(8, 5)
    est = mean_step("ZOMuon", g, 3000, rank=2, interval=1, queries=2, orthogonalize=False)
    assert cosine(est, g) > 0.95
    assert (est - g * 2 / 8).norm() / (g * 2 / 8).norm() < 0.3


def zo_muon_step(g: torch.Tensor, **kw) -> torch.Tensor:
    w = nn.Parameter(torch.zeros_like(g))
    opt = zo.ZOMuon([w], lr=1.0, seed=3, **kw)
    opt.step(lambda: (g * w).sum())
    return -w.detach()


def test_zo_muon_step_is_the_orthogonalised_gradient():
    """With r = m (P square) and 400 queries, G_low = P^T G + noise of relative size ~ sqrt(r n / N) = 0.17.

    For G = 5 Q with orthonormal columns Q (its polar factor is Q) the step P NS5(G_low) is close
    to Q: cosine > 0.9 and every singular value in NS5's band [0.6, 1.25] (not 5: the step's size
    does not depend on the gradient's scale). Newton-Schulz maps *every* non-negligible singular
    value to ~1, noise directions included, so a rank-1 G would not give its rank-1 polar factor.
    """
    q = orthonormal(11, 4, 3, dtype=torch.float64)
    step = zo_muon_step(5.0 * q, rank=4, queries=400)
    assert cosine(step, q) > 0.9
    s = torch.linalg.svdvals(step)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25
    # scale invariance: the same draws with a 1000x larger gradient give the same step
    torch.testing.assert_close(zo_muon_step(5000.0 * q, rank=4, queries=400), step, rtol=1e-6, atol=1e-6)


def test_zo_muon_without_orthogonalisation_scales_with_the_gradient():
    q = orthonormal(11, 4, 3, dtype=torch.float64)
    small = zo_muon_step(q, rank=4, queries=8, orthogonalize=False)
    torch.testing.assert_close(zo_muon_step(3.0 * q, rank=4, queries=8, orthogonalize=False), 3.0 * small)


def test_zo_muon_vectors_take_the_scaled_zo_sgd_step():
    """A 1-D parameter: theta -= lr * scale * mean_i g_i z_i; E = lr * scale * G (unbiased)."""
    g = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    est = mean_step("ZOMuon", g, 2000, queries=2, vector_lr_scale=0.5)
    assert cosine(est, 0.5 * g) > 0.95
    assert (est - 0.5 * g).norm() / (0.5 * g).norm() < 0.3


def test_newton_schulz_approximates_the_polar_factor():
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x + 0.0  # well conditioned: singular values of a 6 x 20 Gaussian are in ~[2, 7]
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    o = newton_schulz5(x)
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25
    assert cosine(o, u @ vh) > 0.95
    assert torch.allclose(newton_schulz5(x.T), o.T, atol=1e-12)  # tall inputs: transposed


def test_orthonormal_factor_is_orthonormal_and_a_function_of_the_seed():
    q = orthonormal(123, 10, 4, dtype=torch.float64)
    assert torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthonormal(123, 10, 4, dtype=torch.float64))
    assert not torch.equal(q, orthonormal(124, 10, 4, dtype=torch.float64))
    assert torch.equal(gaussian(7, 3, 2), gaussian(7, 3, 2))


# ---------------------------------------------------------------------- LOZO-M
def test_lozo_m_with_beta_zero_is_lozo():
    g = linear_target()
    runs = []
    for name, kw in (("LOZO", {}), ("LOZOM", {"beta": 0.0})):
        w = nn.Parameter(torch.zeros_like(g))
        opt = zo.create(name, [w], lr=0.1, rank=2, interval=3, seed=4, **kw)
        for _ in range(7):
            opt.step(lambda w=w: (g * w * w).sum())
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


def test_lozo_m_keeps_an_m_by_r_momentum_per_matrix():
    w, bias = nn.Parameter(torch.ones(7, 5)), nn.Parameter(torch.ones(7))
    opt = zo.LOZOM([w, bias], lr=1e-3, rank=3)
    opt.step(lambda: (w * w).sum() + (bias * bias).sum())
    assert opt.state[w]["momentum_factor"].shape == (7, 3)
    assert "momentum" not in opt.state[w]
    assert opt.state[bias]["momentum"].shape == (7,)


# ---------------------------------------------------------------------- cost and schedule
@pytest.mark.parametrize(("name", "kw", "passes", "forwards"), [
    ("LOZO", {}, 3, 2),
    ("LOZOM", {}, 3, 2),
    ("SubZero", {}, 3, 2),
    ("ZOMuon", {"queries": 3}, 2 * 3 + 1, 4),  # +eps and restore per query, one update pass
])
def test_passes_and_forwards_per_step(name, kw, passes, forwards, monkeypatch):
    w = nn.Parameter(torch.ones(4, 3))
    opt = zo.create(name, [w], lr=1e-3, rank=2, **kw)
    opt.step(lambda: (w * w).sum())
    calls = {"sweeps": 0}
    original = opt._sweep

    def counting(seeds, kernel):
        calls["sweeps"] += 1
        return original(seeds, kernel)

    monkeypatch.setattr(opt, "_sweep", counting)
    opt.step(lambda: (w * w).sum())
    assert calls["sweeps"] == passes
    assert opt.zo_state["forwards"] == 2 * forwards == 2 * opt.forwards_per_step


@pytest.mark.parametrize("name", LOWRANK)
def test_matrices_generate_no_dense_noise(name, monkeypatch):
    """Only the vectors' blocks call the block noise generator: the matrix is never filled."""
    import zotune.optim.sweep as sweep

    w, bias = nn.Parameter(torch.ones(64, 32)), nn.Parameter(torch.ones(64))
    sizes = []
    original = sweep.fill_noise

    def spy(out, seed, distribution="gaussian"):
        sizes.append(out.numel())
        return original(out, seed, distribution)

    monkeypatch.setattr(sweep, "fill_noise", spy)
    opt = zo.create(name, [w, bias], lr=1e-3, rank=2)
    opt.step(lambda: (w * w).sum() + bias.sum())
    assert sizes and max(sizes) == 64


@pytest.mark.parametrize("name", ["LOZO", "SubZero", "ZOMuon"])
def test_factor_memory_is_small_for_matrices(name):
    """Cached factors and state of a 256 x 192 matrix at the published rank: at most 2 r (m + n)."""
    w = nn.Parameter(torch.zeros(256, 192))
    opt = zo.create(name, [w], lr=1e-3)
    opt.step(lambda: (w * w).sum())
    cached = sum(t.numel() for t in opt._windows.values())
    state = sum(t.numel() for k, t in opt.state[w].items() if torch.is_tensor(t))
    r = opt.param_groups[0]["rank"]
    assert cached + state <= 2 * r * (256 + 192)


@pytest.mark.parametrize("name", ["LOZO", "SubZero", "ZOMuon"])
def test_large_matrix_thread_bit_identity(name):
    """GEMM-built directions over many blocks are identical for any worker/intra-op thread counts."""
    results = []
    old = torch.get_num_threads()
    x = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    try:
        for workers, intra in [(1, 1), (2, 2), (3, 1)]:
            torch.set_num_threads(intra)
            torch.manual_seed(0)
            layer = nn.Linear(96, 160)
            opt = zo.create(name, layer, lr=1e-3, rank=8, queries=2, block_size=1024, num_threads=workers) \
                if name == "ZOMuon" else zo.create(name, layer, lr=1e-3, rank=8, block_size=1024,
                                                   num_threads=workers)
            for _ in range(3):
                opt.step(lambda layer=layer: layer(x).pow(2).mean())
            results.append([p.detach().clone() for p in layer.parameters()])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_validation_of_structure_arguments():
    w = nn.Parameter(torch.ones(3, 3))
    for name in LOWRANK:
        with pytest.raises(ValueError, match="rank"):
            zo.create(name, [w], rank=0)
        with pytest.raises(ValueError, match="interval"):
            zo.create(name, [w], interval=0)
    with pytest.raises(ValueError, match="queries"):
        zo.ZOMuon([w], queries=0)
    with pytest.raises(ValueError, match="beta"):
        zo.LOZOM([w], beta=1.0)
    assert math.isclose(zo.ZOMuon([w]).forwards_per_step, 5)


# ---------------------------------------------------------------------- CLI, training loop, HF Trainer
@pytest.mark.parametrize("name", ["lozo", "lozo-m", "subzero", "zo-muon"])
def test_cli_trains_a_tiny_model_with_each_method(tmp_path, name, capsys):
    """`zotune train` end to end on a tiny random model, options through --opt; matrices move."""
    import json

    from zotune.cli import main
    from zotune.testing import tiny_causal_lm, tiny_tokenizer
    from zotune.train import TrainConfig, train

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(steps=3, batch_size=4, max_dev=4, max_test=4, eval_batch_size=4, progress=False,
                         output_dir=str(tmp_path / "run"), task="sst2", optimizer=name, eval_before=False,
                         lr=1e-2, eps=1e-2, optimizer_args={"rank": 2, "interval": 2})
    results = train(config, model=model, tokenizer=tok)
    per_step = zo.get(name)(nn.Linear(2, 2)).forwards_per_step
    assert results["steps"] == 3 and results["forwards"] == 3 * per_step
    moved = [n for n, p in model.named_parameters() if p.dim() == 2 and not torch.equal(before[n], p)]
    assert len(moved) == sum(p.dim() == 2 for p in model.parameters())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer_args"] == {"rank": 2, "interval": 2}
    # a wrong option is one clear line, exit status 2
    code = main(["train", "--optimizer", name, "--opt", "rank=-1", "--output-dir", str(tmp_path / "bad")])
    assert code == 2 and "rank" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["lozo", "lozo-m", "subzero", "zo-muon"])
def test_hf_trainer_integration(tmp_path, name):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from zotune.integrations import ZOTrainer

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            ids = torch.tensor([(i * 7 + k) % 50 + 1 for k in range(8)])
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(8, dtype=torch.long)}

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, max_steps=3, per_device_train_batch_size=4,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = ZOTrainer(model=model, args=args, train_dataset=Tokens(), zo_optimizer=name,
                        zo_kwargs={"eps": 1e-3, "rank": 2, "interval": 2})
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.step_count == 3 and opt.zo_state["forwards"] == 3 * opt.forwards_per_step
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.dim() == 2)


# ---------------------------------------------------------------------- the low-rank quadratic family
def test_lowrank_least_squares_problem():
    """f(0) = d/2 and the gradient at the start, -W* S, has rank 2 (the minimiser W* is rank 2)."""
    from zotune.bench.quadratic import Problem

    p = Problem(100, 100.0, "lowrank")
    x0, loss = p.start_and_loss()
    assert x0.shape == (10, 10) and not x0.any()
    assert loss(x0) == pytest.approx(50.0)
    eye = torch.eye(100, dtype=torch.float64)
    grad = torch.tensor([(loss(e.view(10, 10) * 1e-4) - loss(-e.view(10, 10) * 1e-4)) / 2e-4 for e in eye])
    s = torch.linalg.svdvals(grad.view(10, 10))  # gradient at 0 = -W* S: rank 2
    assert s[1] > 1e-3 * s[0] and s[2] < 1e-6 * s[0]


def test_quadratic_bench_lowrank_smoke(tmp_path):
    import argparse
    import json

    from zotune.bench import quadratic

    parser = argparse.ArgumentParser()
    quadratic.add_arguments(parser)
    args = parser.parse_args(["--problems", "lowrank", "--dims", "2", "4", "--conds", "4", "--seeds", "3",
                              "--max-steps", "150", "--confirm", "1", "--optimizers", "zo-sgd", "lozo",
                              "--json", str(tmp_path / "q.json"), "--markdown", str(tmp_path / "q.md")])
    assert quadratic.run(args) == 0
    results = json.loads((tmp_path / "q.json").read_text())["results"]
    assert {(r["row"], r["problem"], r["d"]) for r in results} == {("ZOSGD", "lowrank", 4), ("LOZO", "lowrank", 4)}
    assert any(r["reached"] >= 2 for r in results)
    assert "low-rank matrix least squares" in (tmp_path / "q.md").read_text()


@pytest.mark.parametrize("name", LOWRANK)
def test_layer_fraction_builds_factors_for_the_sampled_layers_only(name):
    """With layer_fraction, only the step's layers get factors and move (the engine's layer sampling)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6, bias=False) for _ in range(4)])
    x = torch.randn(8, 6)
    opt = zo.create(name, model, lr=1e-2, rank=2, layer_fraction=0.5, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    original = opt._ensure_factors

    def spy(seeds):
        original(seeds)
        seen.extend(sorted(opt._factors[s]) for s in seeds)

    opt._ensure_factors = spy
    opt.step(lambda: model(x).pow(2).mean())
    moved = [i for i, (a, p) in enumerate(zip(before, model.parameters())) if not torch.equal(a, p)]
    assert len(moved) == 2 and all(indices == moved for indices in seen)


def test_lozo_m_momentum_decays_and_moves_on_the_steps_a_layer_is_sampled_out():
    """LOZO-M under layer sampling is LOZO-M with a zero estimate on a layer's sampled-out steps:
    two matrices, half per step in cyclic order (A on even steps, B on odd), V fixed (interval
    100). A's update at step 2 first replays step 1 for A (M = beta M0, W -= lr beta M0 V^T),
    then makes step 2's (M2 = beta^2 M0 + (1 - beta) c2 U2, W -= lr M2 V^T). float64, 1e-12."""
    from zotune.optim.lowrank import step_seed, window_seed
    from zotune.optim.noise import mix_seed

    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(5, 4, dtype=torch.float64)) for _ in range(2))
    x = torch.randn(8, 4, dtype=torch.float64)
    beta, lr, seed = 0.5, 1e-2, 3
    opt = zo.LOZOM([a, b], lr=lr, rank=2, interval=100, beta=beta, seed=seed, layer_fraction=0.5,
                   layer_schedule="cyclic", num_threads=1)
    closure = lambda: (x @ a.T).tanh().sum() + (x @ b.T).pow(2).mean()  # noqa: E731
    v = gaussian(window_seed(seed, "lozo.V", 0, 0), 4, 2, dtype=torch.float64)
    opt.step(closure)  # step 0: A
    m0, w0 = opt.state[a]["momentum_factor"].clone(), a.detach().clone()
    opt.step(closure)  # step 1: B; A untouched
    assert torch.equal(a.detach(), w0) and torch.equal(opt.state[a]["momentum_factor"], m0)
    opt.step(closure)  # step 2: A, with the replay of step 1
    c2 = opt.zo_state["last_projected_grads"][0]
    u2 = gaussian(step_seed(mix_seed(seed, 2, 0), 0), 5, 2, dtype=torch.float64)
    m2 = beta**2 * m0 + (1 - beta) * c2 * u2
    torch.testing.assert_close(opt.state[a]["momentum_factor"], m2, rtol=1e-12, atol=1e-12)
    expected = w0 - lr * beta * m0 @ v.T - lr * m2 @ v.T
    torch.testing.assert_close(a.detach(), expected, rtol=1e-12, atol=1e-12)
    assert opt.state[a]["last_step"] == 2 and opt.state[b]["last_step"] == 1
