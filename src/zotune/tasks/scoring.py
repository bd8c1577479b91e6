"""Scoring language models on tasks: training objectives for ZO optimizers, and evaluation.

:func:`make_objective` returns ``loss_fn(batch: list[Example]) -> scalar fp32 tensor``;
:func:`evaluate` returns ``{"accuracy": ..., "n": ...}`` or ``{"f1": ..., "em": ..., "n": ...}``.
Both work with plain ``transformers`` models and peft-wrapped ones (LoRA, prefix tuning).

How each kind is scored (as in MeZO's ``large_models`` code, arXiv 2305.17333; README "Tasks"):

* **Classification, causal LM, single-token label words** (the fast path): one forward per
  example (prompts left-padded, with an attention mask and position ids that skip the padding),
  logits only at the last prompt position (``logits_to_keep=1``, so no full-vocabulary logits
  over the sequence) and only for the label words' token ids, upcast to fp32: where the LM head is
  a plain ``nn.Linear``, it multiplies by the label words' rows alone (:func:`head_rows`; the
  full head is 12 % of a cached ``top:2`` forward on SmolLM2 and most of a ``final_norm`` one). ``"ce"`` is the
  cross-entropy over those K logits (softmax renormalised over the label words), prediction is
  their argmax.
* **Classification with a multi-token label word**, and **multiple choice**: one sequence per
  (example, candidate); the score is the mean log-probability of the candidate tokens (full
  vocabulary log-softmax in fp32, only at the candidate positions). ``"ce"`` is MeZO's
  ``train_as_classification`` loss (cross-entropy over the candidates' scores) for
  classification, and token CE on the gold candidate only for COPA / ReCoRD
  (``task.train_as_classification`` is False). Prediction is the argmax of the scores.
* **Generation**: ``"ce"`` is teacher-forced token CE on ``task.format_target(answers[0])``
  (``" {answer}\\n"``); evaluation decodes greedily (at most 50 new tokens, stopping at a newline
  or EOS) and reports SQuAD F1 / EM (max over the gold answers).
* **Masked LMs** (``AutoModelForMaskedLM``): the example's ``masked_prompt`` (the LM-BFF
  template) with the mask token; label-word logits at the mask position.

``objective="accuracy"`` returns ``-(batch accuracy)``; ``objective="f1"`` returns ``-mean F1`` of
greedy generations (generation) or ``-macro-F1`` of the batch predictions over the classes
present in the batch (classification). Both are piecewise constant (MeZO §4.4).

Sequences longer than ``max_length`` tokens are truncated from the left, keeping the BOS token
(the candidate / target tokens are always kept).

>>> import torch
>>> from zotune.tasks import get_task, make_objective
>>> from zotune.testing import tiny_causal_lm, tiny_tokenizer
>>> task = get_task("sst2", max_train=4)
>>> tok = tiny_tokenizer(["terrible", "great"]); model = tiny_causal_lm(vocab_size=len(tok))
>>> loss_fn = make_objective(model, tok, task, objective="ce")
>>> with torch.no_grad():
...     loss = loss_fn(task.train)
>>> loss.dtype, loss.ndim
(torch.float32, 0)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from zotune.errors import UserError
from zotune.tasks.base import MASK, Example, Task
from zotune.tasks.metrics import macro_f1, squad_em, squad_f1

Objective = Literal["ce", "accuracy", "f1"]
ModelType = Literal["auto", "causal", "masked"]

#: Upper bound on the elements of one kept-logits tensor (rows x positions x vocab) in the
#: candidate path; bigger batches are split into chunks (results are identical).
LOGITS_ELEMENT_BUDGET = 1 << 27


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_masked_lm(model: Any) -> bool:
    """True for ``*ForMaskedLM`` models (also inside peft wrappers)."""
    inner = _unwrap(model)
    name = type(inner).__name__
    if "MaskedLM" in name or "CausalLM" in name or "LMHead" in name:
        return "MaskedLM" in name
    architectures = getattr(getattr(inner, "config", None), "architectures", None) or []
    return any(str(a).endswith("ForMaskedLM") for a in architectures)


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _peft_prompt_learning(model: Any) -> tuple[bool, bool]:
    """(uses prompt learning, is prefix tuning) of a peft model; (False, False) otherwise."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return False, False
    return True, str(getattr(config, "peft_type", "")).upper().endswith("PREFIX_TUNING")


@contextlib.contextmanager
def head_rows(model: Any, rows: Sequence[int]) -> Iterator[bool]:
    """While inside, the causal LM head computes only the logits of the token ids ``rows`` (in that
    order, last dimension ``len(rows)``) and yields True; yields False and changes nothing where it
    cannot do so exactly: a head that is not a plain ``nn.Linear`` (a LoRA-wrapped or quantised
    head), whose forward someone else has replaced (accelerate's device hooks), or whose weight is
    sharded (FSDP's DTensor). The rows are read from the current weight at every forward, so a
    perturbed (trainable) or tied head gives the perturbed logits."""
    inner = _unwrap(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if (type(head) is not torch.nn.Linear or "forward" in vars(head) or hasattr(head, "_hf_hook")
            or type(head.weight.data) is not torch.Tensor):
        yield False
        return
    index = torch.tensor(list(rows), dtype=torch.long, device=head.weight.device)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        bias = head.bias.index_select(0, index) if head.bias is not None else None
        return F.linear(hidden, head.weight.index_select(0, index), bias)

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield True
    finally:
        del head.forward


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text (e.g. ``[<s>]``, ``[</s>]``)."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        values = torch.tensor(list(seq), dtype=torch.long)
        if left:
            ids[row, width - len(seq):] = values
            mask[row, width - len(seq):] = 1
        else:
            ids[row, :len(seq)] = values
            mask[row, :len(seq)] = 1
    return ids, mask


class TaskScorer:
    """Turns examples of one task into tensors, runs the model, and computes scores and losses.

    Use :func:`make_objective` and :func:`evaluate` unless you need the pieces:

    * :meth:`label_word_logits` (classification fast path): ``(B, K)`` fp32 logits.
    * :meth:`candidate_scores`: per example, the mean log-prob of each candidate (fp32).
    * :meth:`gold_token_nll`: token-level CE on the gold continuations.
    * :meth:`predict` / :meth:`generate`.

    Args:
        model: a causal or masked LM from transformers, possibly wrapped by peft.
        tokenizer: its tokenizer; one without a pad token pads with EOS (any id works: padding
            is masked out).
        task: a :class:`Task`.
        max_length: token budget per sequence (default ``task.max_length``).
        model_type: ``"auto"`` (detect), ``"causal"`` or ``"masked"``.
        max_new_tokens: generation budget (MeZO: 50); prompts are truncated to leave room for it.
    """

    def __init__(self, model: Any, tokenizer: Any, task: Task, *, max_length: int | None = None,
                 model_type: ModelType = "auto", max_new_tokens: int = 50) -> None:
        if model_type not in ("auto", "causal", "masked"):
            raise UserError(f"unknown model_type {model_type!r}; use auto, causal or masked")
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = int(max_length or task.max_length)
        self.max_new_tokens = max_new_tokens
        self.masked = is_masked_lm(model) if model_type == "auto" else model_type == "masked"
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad_id)
        self.prefix_ids, self.suffix_ids = _special_frame(tokenizer)
        if not self.masked:
            self.suffix_ids = []  # causal prompts must end right where the candidate starts
        if self.max_length <= len(self.prefix_ids) + len(self.suffix_ids) + 1:
            raise UserError(f"max_length={self.max_length} is too small")
        self._forward_options = self._supported_forward_options(model)
        self._encode_cached = functools.lru_cache(maxsize=1 << 17)(self._encode)
        self.label_token_ids: list[int] | None = None
        if self.masked:
            if task.kind != "classification":
                raise UserError(f"task {task.name!r} is {task.kind}; masked LMs support classification tasks only "
                                "(use a causal LM)")
            if tokenizer.mask_token is None:
                raise UserError("this masked LM's tokenizer has no mask token")
            self.label_token_ids = self._masked_label_ids()
        elif task.kind == "classification":
            self.label_token_ids = self._single_token_label_ids()

    # ---------------------------------------------------------------- tokenisation

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of ``text`` without special tokens (cached)."""
        return self._encode_cached(text)

    @property
    def uses_label_word_fast_path(self) -> bool:
        """True when classification scores the label words' logits at one position."""
        return self.label_token_ids is not None

    def _single_token_label_ids(self) -> list[int] | None:
        """Label-word token ids when each label word is one token right after the task's prompts."""
        words = self.task.label_words or []
        found: list[int] | None = None
        for prompt in self.task.probe_prompts(4) or [""]:
            context = self.encode(prompt)
            ids = []
            for word in words:
                full = self.encode(prompt + word)
                if len(full) != len(context) + 1 or full[:len(context)] != context:
                    return None
                ids.append(full[-1])
            if found is not None and ids != found:
                return None
            found = ids
        if found is None or len(set(found)) != len(found):
            return None
        return found

    def _masked_label_ids(self) -> list[int]:
        ids = []
        for word in self.task.label_words or []:
            encoded = self.encode(word)
            if len(encoded) != 1:
                raise UserError(f"label word {word!r} is {len(encoded)} tokens for this masked LM's tokenizer; "
                                "masked-LM scoring needs single-token label words (choose another template)")
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise UserError(f"label words {self.task.label_words} share a token id for this tokenizer")
        return ids

    def _truncate(self, body: Sequence[int], budget: int) -> list[int]:
        """``prefix + body[-budget':]`` so that the whole sequence fits ``budget`` tokens."""
        room = budget - len(self.prefix_ids) - len(self.suffix_ids)
        return [*self.prefix_ids, *body[-room:], *self.suffix_ids] if room > 0 else [*self.prefix_ids]

    def prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        """Tokens of a causal prompt (BOS kept, left-truncated to ``max_length - reserve``)."""
        return self._truncate(self.encode(prompt), self.max_length - reserve)

    def continuation_ids(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """Tokens of ``prompt + continuation`` and how many trailing tokens are the continuation.

        The split point is where the tokens of ``prompt + continuation`` stop matching those of
        ``prompt`` alone (MeZO's ``option_len``), so a merge across the boundary counts as
        continuation. The continuation is never truncated away.
        """
        context = self.encode(prompt)
        full = self.encode(prompt + continuation)
        n_continuation = len(full) - _common_prefix_length(context, full)
        if n_continuation == 0:
            raise UserError(f"continuation {continuation!r} adds no tokens to the prompt")
        ids = self._truncate(full, self.max_length)
        return ids, min(n_continuation, len(ids) - len(self.prefix_ids))

    def masked_ids(self, example: Example) -> tuple[list[int], int]:
        """Masked-LM tokens of ``example.masked_prompt`` and the mask position."""
        template = example.masked_prompt if example.masked_prompt is not None else example.prompt + MASK
        before, _, after = template.partition(MASK)
        left = self.encode(before)
        mask_id = self.tokenizer.mask_token_id
        right = self.encode(after)
        room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids) - 1
        # Keep the mask; when too long, give each side at least half the room (trim the left's start).
        n_right = min(len(right), max(room // 2, room - len(left)))
        n_left = min(len(left), room - n_right)
        keep_left, keep_right = left[len(left) - n_left:], right[:n_right]
        ids = [*self.prefix_ids, *keep_left, mask_id, *keep_right, *self.suffix_ids]
        return ids, len(self.prefix_ids) + len(keep_left)

    # ---------------------------------------------------------------- forward passes

    @staticmethod
    def _supported_forward_options(model: Any) -> dict[str, Any]:
        inner = _unwrap(model)
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            params = {}
        prompt_learning, prefix = _peft_prompt_learning(model)
        return {
            "logits_to_keep": "logits_to_keep" if "logits_to_keep" in params else
            ("num_logits_to_keep" if "num_logits_to_keep" in params else None),
            "position_ids": "position_ids" in params and (not prompt_learning or prefix),
            "use_cache": "use_cache" in params and not prompt_learning,
        }

    def _causal_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions, ``(B, keep, V)``, in the model's dtype."""
        device = _model_device(self.model)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        options = self._forward_options
        if options["position_ids"]:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_(min=0).to(device)
        if options["use_cache"]:
            kwargs["use_cache"] = False
        if options["logits_to_keep"]:
            kwargs[options["logits_to_keep"]] = keep
        logits = self.model(**kwargs).logits
        return logits[:, -keep:, :]

    def label_word_logits(self, examples: Sequence[Example]) -> torch.Tensor:
        """``(B, K)`` fp32 logits of the label words at the label position (fast path only)."""
        if self.label_token_ids is None:
            raise RuntimeError("label_word_logits needs single-token label words; use candidate_scores")
        label_ids = torch.tensor(self.label_token_ids, dtype=torch.long)
        if self.masked:
            encoded = [self.masked_ids(ex) for ex in examples]
            input_ids, attention_mask = _pad([ids for ids, _ in encoded], self.pad_id, left=False)
            device = _model_device(self.model)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            rows = torch.arange(len(examples), device=logits.device)
            positions = torch.tensor([pos for _, pos in encoded], device=logits.device)
            return logits[rows, positions][:, label_ids.to(logits.device)].float()
        # Reserve one token for the label word, so truncation matches the candidate path (MeZO
        # truncates prompt + option to max_length).
        prompts = [self.prompt_ids(ex.prompt, reserve=1) for ex in examples]
        input_ids, attention_mask = _pad(prompts, self.pad_id, left=True)
        with head_rows(self.model, self.label_token_ids) as only_labels:
            last = self._causal_logits(input_ids, attention_mask, keep=1)[:, -1, :]
        return (last if only_labels else last[:, label_ids.to(last.device)]).float()

    def continuation_token_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[torch.Tensor]:
        """Per pair, the fp32 log-probabilities of the continuation's tokens given the prompt."""
        encoded = [self.continuation_ids(p, c) for p, c in zip(prompts, continuations, strict=True)]
        vocab = int(getattr(_unwrap(self.model).config, "vocab_size", 0) or len(self.tokenizer))
        results: list[torch.Tensor] = []
        start = 0
        while start < len(encoded):
            # Grow the chunk while the kept-logits tensor stays under the budget.
            stop = start + 1
            longest = encoded[start][1]
            while stop < len(encoded):
                candidate_longest = max(longest, encoded[stop][1])
                if (stop - start + 1) * (candidate_longest + 1) * vocab > LOGITS_ELEMENT_BUDGET:
                    break
                longest = candidate_longest
                stop += 1
            chunk = encoded[start:stop]
            input_ids, attention_mask = _pad([ids for ids, _ in chunk], self.pad_id, left=True)
            keep = longest + 1
            logits = self._causal_logits(input_ids, attention_mask, keep=keep)
            targets = input_ids.to(logits.device)
            for row, (_, n) in enumerate(chunk):
                # positions keep-n-1 .. keep-2 predict the last n tokens
                predicting = logits[row, keep - n - 1: keep - 1, :].float()
                target = targets[row, -n:]
                log_probs = predicting.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
                results.append(log_probs)
            start = stop
        return results

    def candidate_scores(self, examples: Sequence[Example]) -> list[torch.Tensor]:
        """Per example, ``(C,)`` fp32 mean log-probabilities of its candidates (length-normalised)."""
        prompts = [ex.prompt for ex in examples for _ in ex.candidates]
        continuations = [c for ex in examples for c in ex.candidates]
        token_logprobs = self.continuation_token_logprobs(prompts, continuations)
        scores, position = [], 0
        for ex in examples:
            n = len(ex.candidates)
            scores.append(torch.stack([lp.mean() for lp in token_logprobs[position:position + n]]))
            position += n
        return scores

    def gold_token_nll(self, examples: Sequence[Example]) -> torch.Tensor:
        """Mean token cross-entropy over the gold continuations of the batch (MeZO ``only_train_option``)."""
        if self.task.kind == "generation":
            targets = [self.task.format_target(ex.answers[0]) for ex in examples]
        else:
            targets = [ex.candidates[ex.gold] for ex in examples]
        token_logprobs = self.continuation_token_logprobs([ex.prompt for ex in examples], targets)
        return -torch.cat(token_logprobs).mean()

    # ---------------------------------------------------------------- predictions

    def class_scores(self, examples: Sequence[Example]) -> list[torch.Tensor]:
        """Per example, fp32 scores over its candidates (label-word logits or mean log-probs)."""
        if self.task.kind == "classification" and self.label_token_ids is not None:
            return list(self.label_word_logits(examples))
        return self.candidate_scores(examples)

    def predict(self, examples: Sequence[Example]) -> list[int]:
        """Predicted candidate index per example (classification / multiple choice)."""
        return [int(s.argmax()) for s in self.class_scores(examples)]

    def generate(self, examples: Sequence[Example], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations, cut at the first newline, stripped."""
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        input_ids, attention_mask = _pad([self.prompt_ids(ex.prompt, reserve=budget) for ex in examples],
                                         self.pad_id, left=True)
        prompt_width = input_ids.shape[1]
        tokenizer = self.tokenizer

        class StopAtNewline(StoppingCriteria):
            def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
                texts = tokenizer.batch_decode(ids[:, prompt_width:], skip_special_tokens=True)
                return torch.tensor(["\n" in t for t in texts], dtype=torch.bool, device=ids.device)

        eos = tokenizer.eos_token_id
        config = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                                  eos_token_id=eos, bos_token_id=tokenizer.bos_token_id)
        device = _model_device(self.model)
        stopping = StoppingCriteriaList([StopAtNewline()])
        output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     generation_config=config, stopping_criteria=stopping)
        texts = tokenizer.batch_decode(output[:, prompt_width:], skip_special_tokens=True)
        return [t.split("\n")[0].strip() for t in texts]


def _check_objective(task: Task, objective: str) -> None:
    allowed = {"classification": ("ce", "accuracy", "f1"), "multiple_choice": ("ce", "accuracy"),
               "generation": ("ce", "f1")}[task.kind]
    if objective not in allowed:
        raise UserError(f"objective {objective!r} is not available for {task.kind} task {task.name!r}; "
                        f"use one of: {', '.join(allowed)}")


def make_objective(
    model: Any,
    tokenizer: Any,
    task: Task,
    objective: Objective = "ce",
    max_length: int | None = None,
    *,
    model_type: ModelType = "auto",
    max_new_tokens: int = 50,
) -> Callable[[list[Example]], torch.Tensor]:
    """The training loss of ``task`` as ``loss_fn(batch) -> scalar fp32 tensor`` (see module docs).

    ``"ce"``: cross-entropy (label words, candidates, or gold tokens by task kind); ``"accuracy"``:
    ``-accuracy`` (classification, multiple choice); ``"f1"``: ``-mean F1`` of greedy generations
    (generation) or ``-macro-F1`` of the predictions (classification). The function does not
    switch the model's train/eval mode and does not disable autograd: call it under
    ``torch.no_grad()`` (or ``torch.inference_mode()``) for zeroth-order training. The scorer is
    attached as ``loss_fn.scorer``.
    """
    _check_objective(task, objective)
    scorer = TaskScorer(model, tokenizer, task, max_length=max_length, model_type=model_type,
                        max_new_tokens=max_new_tokens)

    def loss_fn(batch: list[Example]) -> torch.Tensor:
        if not batch:
            raise ValueError("empty batch")
        if objective == "ce":
            if task.kind == "generation" or not task.train_as_classification:
                return scorer.gold_token_nll(batch)
            if task.kind == "classification" and scorer.uses_label_word_fast_path:
                logits = scorer.label_word_logits(batch)
                golds = torch.tensor([ex.gold for ex in batch], device=logits.device)
                return F.cross_entropy(logits, golds)
            losses = [F.cross_entropy(s.unsqueeze(0), torch.tensor([ex.gold], device=s.device))
                      for s, ex in zip(scorer.candidate_scores(batch), batch, strict=True)]
            return torch.stack(losses).mean()
        if objective == "accuracy":
            predictions = scorer.predict(batch)
            correct = sum(p in ex.correct_indices for p, ex in zip(predictions, batch, strict=True))
            return torch.tensor(-correct / len(batch), dtype=torch.float32, device=_model_device(model))
        if task.kind == "generation":
            texts = scorer.generate(batch)
            f1 = sum(squad_f1(t, ex.answers) for t, ex in zip(texts, batch, strict=True)) / len(batch)
            return torch.tensor(-f1, dtype=torch.float32, device=_model_device(model))
        predictions = scorer.predict(batch)
        return torch.tensor(-macro_f1(predictions, [ex.gold for ex in batch]), dtype=torch.float32,
                            device=_model_device(model))

    loss_fn.scorer = scorer  # type: ignore[attr-defined]
    return loss_fn


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    *,
    model_type: ModelType = "auto",
    max_new_tokens: int = 50,
) -> dict[str, float]:
    """Score ``examples`` (default: ``task.test``) with the model in eval mode, under ``no_grad``.

    Returns ``{"accuracy", "n"}`` (plus ``"macro_f1"`` for classification) or
    ``{"f1", "em", "n"}`` for generation, metrics in [0, 1]. The model's train/eval mode is
    restored afterwards.
    """
    examples = list(task.test if examples is None else examples)
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    scorer = TaskScorer(model, tokenizer, task, max_length=max_length, model_type=model_type,
                        max_new_tokens=max_new_tokens)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            if task.kind == "generation":
                f1_total = em_total = 0.0
                for start in range(0, len(examples), batch_size):
                    batch = examples[start:start + batch_size]
                    for text, ex in zip(scorer.generate(batch), batch, strict=True):
                        f1_total += squad_f1(text, ex.answers)
                        em_total += squad_em(text, ex.answers)
                n = max(len(examples), 1)
                return {"f1": f1_total / n, "em": em_total / n, "n": len(examples)}
            predictions: list[int] = []
            for start in range(0, len(examples), batch_size):
                predictions += scorer.predict(examples[start:start + batch_size])
    finally:
        model.train(was_training)
    correct = sum(p in ex.correct_indices for p, ex in zip(predictions, examples, strict=True))
    metrics: dict[str, float] = {"accuracy": correct / max(len(examples), 1), "n": len(examples)}
    if task.kind == "classification":
        metrics["macro_f1"] = macro_f1(predictions, [ex.gold for ex in examples])
    return metrics
