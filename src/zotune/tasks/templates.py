"""Prompt templates and label words of every built-in task.

Two families (README "Tasks"):

* **MeZO OPT templates** (``template="mezo"``; MeZO ``large_models/templates.py``), used by
  default for the SuperGLUE tasks, SQuAD and DROP. Where the MeZO prompt ends in a space
  (COPA's ``" so "``) the space moves to the candidate, as MeZO's ``encode_prompt`` does by
  stripping the prompt, so the candidate tokens are exactly the continuation.
* **LM-BFF templates** (``template="lmbff"``; MeZO ``medium_models/run_fewshot.sh``), used by
  default for SST-2/SST-5/TREC/SNLI/MNLI/RTE. A masked LM gets the exact LM-BFF text with the
  mask token. A causal LM gets a prompt that ends right before the mask position and scores the
  label words (each with its leading space) as the next token. Where LM-BFF's mask is not at the
  end of the text (TREC ``<mask>: {S1}``, NLI ``{S1}?<mask>, {s2}``), the causal prompt cannot
  simply stop at the mask (the model would never see the question or the hypothesis), so the
  label word is moved to the end behind a short cue; the label words are unchanged:

  - SST-2: ``{sentence} It was`` + `` terrible`` / `` great``
  - SST-5: ``{sentence} It was`` + `` terrible`` / `` bad`` / `` okay`` / `` good`` / `` great``
  - TREC: ``{question}\\nAnswer type:`` + `` Description`` / `` Entity`` / `` Expression`` / `` Human`` /
    `` Location`` / `` Number``
  - SNLI, MNLI: ``{premise}\\nQuestion: {hypothesis} Yes, No, or Maybe?\\nAnswer:`` + `` Yes`` / `` Maybe`` /
    `` No``
  - RTE: ``{premise}\\nQuestion: {hypothesis} Yes or No?\\nAnswer:`` + `` Yes`` / `` No``

Label indices: NLI tasks use the Hugging Face order (0 entailment, 1 neutral, 2 contradiction;
RTE 0 entailment, 1 not_entailment).

>>> row = {"sentence": "a gorgeous film .", "label": 1}
>>> TEMPLATES["sst2"]["sentiment"].prompt(row)
'Review: a gorgeous film .\\nSentiment:'
"""

from __future__ import annotations

from zotune.tasks.base import MASK, Row, Template

SST2_WORDS = (" terrible", " great")
SST5_WORDS = (" terrible", " bad", " okay", " good", " great")
TREC_WORDS = (" Description", " Entity", " Expression", " Human", " Location", " Number")
NLI3_WORDS = (" Yes", " Maybe", " No")  # entailment, neutral, contradiction
NLI2_WORDS = (" Yes", " No")  # entailment, not_entailment


def _strip_final_punct(text: str) -> str:
    """LM-BFF ``sent-_0``: the sentence with its last character removed when it is punctuation."""
    text = text.strip()
    return text[:-1] if text and not text[-1].isalnum() else text


def _lower_first(text: str) -> str:
    """LM-BFF ``sentl_1``: first letter lower-cased."""
    text = text.strip()
    return text[:1].lower() + text[1:]


def _question_mark(question: str) -> str:
    """MeZO BoolQ: capitalise the question and append "?" when missing."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return question[:1].upper() + question[1:]


def _copa_prompt(row: Row) -> str:
    premise = row["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    if row["question"] == "effect":
        return premise + " so"
    if row["question"] == "cause":
        return premise + " because"
    raise ValueError(f"COPA question must be 'cause' or 'effect', got {row['question']!r}")


def _copa_choice(choice: str) -> str:
    """MeZO's ``capitalization="correct"``: lower-case the first word unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " " + " ".join(words)


def _sentence(row: Row) -> str:
    return row["sentence"].strip()


SST2 = {
    "mezo": Template(
        "mezo", "MeZO/LM-BFF: '{sentence} It was' + ' terrible'/' great'",
        prompt=lambda r: f"{_sentence(r)} It was",
        label_words=SST2_WORDS,
        masked_prompt=lambda r: f"{_sentence(r)} It was{MASK}."),
    "lmbff": Template(
        "lmbff", "LM-BFF '<S1> It was<mask>.' (same causal prompt as 'mezo')",
        prompt=lambda r: f"{_sentence(r)} It was",
        label_words=SST2_WORDS,
        masked_prompt=lambda r: f"{_sentence(r)} It was{MASK}."),
    "sentiment": Template(
        "sentiment", "'Review: {sentence}\\nSentiment:' + ' negative'/' positive'",
        prompt=lambda r: f"Review: {_sentence(r)}\nSentiment:",
        label_words=(" negative", " positive"),
        masked_prompt=lambda r: f"Review: {_sentence(r)}\nSentiment:{MASK}"),
}

SST5 = {
    "lmbff": Template(
        "lmbff", "LM-BFF '<S1> It was<mask>.' with terrible/bad/okay/good/great",
        prompt=lambda r: f"{_sentence(r)} It was",
        label_words=SST5_WORDS,
        masked_prompt=lambda r: f"{_sentence(r)} It was{MASK}."),
    "sentiment": Template(
        "sentiment", "'Review: {sentence}\\nSentiment:' with terrible/bad/okay/good/great",
        prompt=lambda r: f"Review: {_sentence(r)}\nSentiment:",
        label_words=SST5_WORDS,
        masked_prompt=lambda r: f"Review: {_sentence(r)}\nSentiment:{MASK}"),
}

TREC = {
    "lmbff": Template(
        "lmbff", "LM-BFF '<mask>: {S1}'; causal: '{question}\\nAnswer type:' + ' Description'...",
        prompt=lambda r: f"{_sentence(r)}\nAnswer type:",
        label_words=TREC_WORDS,
        masked_prompt=lambda r: f"{MASK}: {_sentence(r)}"),
}


def _nli_lmbff_masked(r: Row) -> str:
    return f"{_strip_final_punct(r['premise'])}?{MASK}, {_lower_first(r['hypothesis'])}"


NLI3 = {
    "lmbff": Template(
        "lmbff", "LM-BFF '<S1>?<mask>, <s2>'; causal: '{premise}\\nQuestion: {hypothesis} Yes, No, or "
                 "Maybe?\\nAnswer:' + ' Yes'/' Maybe'/' No'",
        prompt=lambda r: f"{r['premise'].strip()}\nQuestion: {r['hypothesis'].strip()} Yes, No, or Maybe?\nAnswer:",
        label_words=NLI3_WORDS,
        masked_prompt=_nli_lmbff_masked),
    "mezo": Template(
        "mezo", "MeZO's 3-way NLI (CB) template: 'Suppose {premise} Can we infer that \"{hypothesis}\"? "
                "Yes, No, or Maybe?\\n' + Yes/Maybe/No",
        prompt=lambda r: f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n",
        label_words=("Yes", "Maybe", "No")),
}

RTE_MEZO = Template(
    "mezo", "MeZO: '{premise}\\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\\n' + Yes/No",
    prompt=lambda r: f"{r['premise']}\nDoes this mean that \"{r['hypothesis']}\" is true? Yes or No?\n",
    label_words=("Yes", "No"))

RTE = {
    "lmbff": Template(
        "lmbff", "LM-BFF '<S1>?<mask>, <s2>'; causal: '{premise}\\nQuestion: {hypothesis} Yes or No?\\n"
                 "Answer:' + ' Yes'/' No'",
        prompt=lambda r: f"{r['premise'].strip()}\nQuestion: {r['hypothesis'].strip()} Yes or No?\nAnswer:",
        label_words=NLI2_WORDS,
        masked_prompt=_nli_lmbff_masked),
    "mezo": RTE_MEZO,
}

BOOLQ = {
    "mezo": Template(
        "mezo", "MeZO BoolQ v3: '{passage} {Question}?\\n' + Yes/No",
        prompt=lambda r: f"{r['passage']} {_question_mark(r['question'])}\n",
        label_words=("Yes", "No")),
}

CB = {
    "mezo": Template(
        "mezo", "MeZO: 'Suppose {premise} Can we infer that \"{hypothesis}\"? Yes, No, or Maybe?\\n'",
        prompt=lambda r: f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n",
        label_words=("Yes", "No", "Maybe")),
}

WSC = {
    "mezo": Template(
        "mezo", "MeZO: '{text}\\nIn the previous sentence, does the pronoun \"{span2}\" refer to {span1}? "
                "Yes or No?\\n' + No/Yes",
        prompt=lambda r: (f"{r['text']}\nIn the previous sentence, does the pronoun \"{r['span2_text'].lower()}\" "
                          f"refer to {r['span1_text']}? Yes or No?\n"),
        label_words=("No", "Yes")),
}

WIC = {
    "mezo": Template(
        "mezo", "MeZO: 'Does the word \"{word}\" have the same meaning in these two sentences? Yes, No?"
                "\\n{sent1}\\n{sent2}\\n' + No/Yes",
        prompt=lambda r: (f"Does the word \"{r['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                          f"{r['sentence1']}\n{r['sentence2']}\n"),
        label_words=("No", "Yes")),
}

MULTIRC = {
    "mezo": Template(
        "mezo", "MeZO: '{paragraph}\\nQuestion: {question}\\nI found this answer \"{answer}\". Is that "
                "correct? Yes or No?\\n' + No/Yes",
        prompt=lambda r: (f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer \"{r['answer']}\". "
                          "Is that correct? Yes or No?\n"),
        label_words=("No", "Yes")),
}

COPA = {
    "mezo": Template(
        "mezo", "MeZO: '{premise without final .} so|because' + ' {choice, first word lower-cased}'",
        prompt=_copa_prompt,
        choices=lambda r: [_copa_choice(r["choice1"]), _copa_choice(r["choice2"])]),
}

RECORD = {
    "mezo": Template(
        "mezo", "MeZO GPT-3 style: passage with '@highlight\\n' -> '- ', then '\\n-'; candidate ' {query "
                "with @placeholder = entity}'",
        prompt=lambda r: r["passage"].replace("@highlight\n", "- ") + "\n-",
        choices=lambda r: [" " + r["query"].replace("@placeholder", entity) for entity in r["entities"]]),
}

SQUAD = {
    "mezo": Template(
        "mezo", "MeZO: 'Title: {title}\\nContext: {context}\\nQuestion: {question}\\nAnswer:'; target "
                "' {answer}\\n'",
        prompt=lambda r: f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question'].strip()}\nAnswer:"),
}

DROP = {
    "mezo": Template(
        "mezo", "MeZO: 'Passage: {context}\\nQuestion: {question}\\nAnswer:'; target ' {answer}\\n'",
        prompt=lambda r: f"Passage: {r['context']}\nQuestion: {r['question'].strip()}\nAnswer:"),
}

#: task name -> template name -> :class:`Template`; the first entry is listed first in help.
TEMPLATES: dict[str, dict[str, Template]] = {
    "sst2": SST2,
    "sst5": SST5,
    "trec": TREC,
    "snli": NLI3,
    "mnli": NLI3,
    "rte": RTE,
    "rte-superglue": {"mezo": RTE_MEZO, "lmbff": RTE["lmbff"]},
    "boolq": BOOLQ,
    "cb": CB,
    "copa": COPA,
    "wic": WIC,
    "wsc": WSC,
    "multirc": MULTIRC,
    "record": RECORD,
    "squad": SQUAD,
    "drop": DROP,
}
