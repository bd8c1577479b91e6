"""Tiny random models and an in-code tokenizer for tests: no files, no downloads, milliseconds.

>>> from zotune.testing import tiny_causal_lm, tiny_tokenizer
>>> tok = tiny_tokenizer(extra_words=["great", "terrible"])
>>> model = tiny_causal_lm("llama", vocab_size=len(tok))
>>> batch = tok(["it was great", "terrible"], return_tensors="pt", padding=True)
>>> model(**batch).logits.shape
torch.Size([2, 3, 134])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "CAUSAL_ARCHS",
    "SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "TINY_WORDS",
    "tiny_causal_lm",
    "tiny_config",
    "tiny_masked_lm",
    "tiny_tokenizer",
]

#: Special tokens of :func:`tiny_tokenizer`, with ids 0..4 in this order.
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}

#: Base vocabulary of :func:`tiny_tokenizer` (lower case; the tokenizer lower-cases its input).
_WORDS = """
the a an and or but not no yes of to in on at for with by from as is was are were be been it
this that these those there here he she they we you i me my your his her their our its what
which who when where why how question answer review sentiment label text sentence premise
hypothesis context passage true false maybe neither entailment contradiction neutral positive
negative great good bad terrible awful fine okay movie film story book day time people world
very really so too quite more most less one two three four five six seven eight nine ten
, . ? ! : ; ' " ( ) - _ / 0 1 2 3 4 5 6 7 8 9
"""
TINY_WORDS: tuple[str, ...] = tuple(_WORDS.split())

#: Default vocabulary size of the tiny models (more than :func:`tiny_tokenizer` uses by default).
TINY_VOCAB_SIZE = 256

#: Architectures :func:`tiny_causal_lm` can build.
CAUSAL_ARCHS: tuple[str, ...] = ("llama", "gpt2", "opt", "gemma3", "qwen2", "mistral")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_tokenizer(
    extra_words: Iterable[str] = (),
    *,
    add_bos: bool = False,
    add_eos: bool = False,
    padding_side: str = "left",
    model_max_length: int = 512,
) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` built in code (no files).

    Words are lower-cased and split on whitespace and punctuation; unknown words map to
    ``<unk>``. Ids 0-4 are ``<pad> <s> </s> <unk> <mask>``, then :data:`TINY_WORDS`, then
    ``extra_words`` (lower-cased, de-duplicated) in order, so every word is one token. The
    default vocabulary has 134 entries, and the tiny models default to
    :data:`TINY_VOCAB_SIZE` (256) rows; size a model with ``vocab_size=len(tok)`` when you add
    many words. ``add_bos``/``add_eos`` wrap every encoded sequence.

    >>> tok = tiny_tokenizer(["Wonderful"])
    >>> tok.convert_ids_to_tokens(tok("A wonderful, film!")["input_ids"])
    ['a', 'wonderful', ',', 'film', '!']
    >>> tok.pad_token, tok.eos_token, tok.mask_token, tok.padding_side
    ('<pad>', '</s>', '<mask>', 'left')
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS.values(), *TINY_WORDS, *(str(w).lower() for w in extra_words)]:
        if w and w not in vocab:
            vocab[w] = len(vocab)
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    if add_bos or add_eos:
        single = " ".join([*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])])
        pair = " ".join(
            [
                *([bos] if add_bos else []),
                "$A",
                *([eos] if add_eos else []),
                "$B:1",
                *([eos + ":1"] if add_eos else []),
            ]
        )
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=bos,
        eos_token=eos,
        unk_token=SPECIAL_TOKENS["unk"],
        mask_token=SPECIAL_TOKENS["mask"],
        padding_side=padding_side,
        model_max_length=model_max_length,
    )
    return tok


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_positions: int = 128,
) -> Any:
    """The transformers config of a tiny model (4 heads of 8 dims at hidden 32; 2 KV heads for llama).

    Special token ids follow :func:`tiny_tokenizer`: pad 0, bos 1, eos 2.
    """
    import transformers as tf

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": max_positions,
        **ids,
    }
    ffn = 2 * hidden_size
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        return cls(intermediate_size=ffn, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            intermediate_size=ffn,
            num_key_value_heads=1,
            head_dim=hidden_size // 4,
            sliding_window=16,
            **common,
        )
    if arch == "opt":
        return tf.OPTConfig(ffn_dim=ffn, word_embed_proj_dim=hidden_size, **common)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=max_positions,
            n_inner=ffn,
            **ids,
        )
    if arch in ("roberta", "bert"):
        cls = tf.RobertaConfig if arch == "roberta" else tf.BertConfig
        # RoBERTa numbers positions from pad_token_id + 1.
        return cls(
            intermediate_size=ffn,
            type_vocab_size=1,
            **{**common, "max_position_embeddings": max_positions + 2},
        )
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {(*CAUSAL_ARCHS, 'roberta', 'bert')}")


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
) -> Any:
    """A randomly initialised tiny causal LM (hidden 32, 2 layers) in eval mode.

    ``arch`` is one of :data:`CAUSAL_ARCHS`. The same ``seed`` gives the same weights; the
    global torch RNG is left untouched. Llama/Qwen2/Mistral/GPT-2/OPT tie the LM head to the
    embedding, as SmolLM2 and Gemma do.

    >>> m = tiny_causal_lm("gpt2", seed=1)
    >>> type(m).__name__, m.training
    ('GPT2LMHeadModel', False)
    """
    from transformers import AutoModelForCausalLM

    from zotune.models import _cast_parameters

    if arch not in CAUSAL_ARCHS:
        raise ValueError(f"unknown tiny causal arch {arch!r}; choose one of {CAUSAL_ARCHS}")
    cfg = tiny_config(arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg)
    _cast_parameters(model, dtype)  # same seed, same (rounded) weights in every dtype; buffers stay fp32
    return model.eval()


def tiny_masked_lm(
    arch: str = "roberta",
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A randomly initialised tiny masked LM (RoBERTa or BERT, hidden 32, 2 layers) in eval mode.

    Use with ``tiny_tokenizer(padding_side="right", add_bos=True, add_eos=True)``; its
    ``<mask>`` token has id 4.

    >>> type(tiny_masked_lm()).__name__
    'RobertaForMaskedLM'
    """
    from transformers import AutoModelForMaskedLM

    from zotune.models import _cast_parameters

    if arch not in ("roberta", "bert"):
        raise ValueError(f"unknown tiny masked arch {arch!r}; choose 'roberta' or 'bert'")
    cfg = tiny_config(arch, vocab_size=vocab_size)
    with _seeded(seed):
        model = AutoModelForMaskedLM.from_config(cfg)
    _cast_parameters(model, dtype)  # same seed, same (rounded) weights in every dtype; buffers stay fp32
    return model.eval()
