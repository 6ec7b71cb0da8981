"""Named formatters: one raw example of a multi-field dataset -> the task schema's ``text`` / ``text_pair``.

The paper does not say how COPA, WiC, WSC and MultiRC were fed to a sequence classifier. These
formatters follow the local copies in ``shared/data`` (see their ``meta.json`` notes), so a dataset
loaded from the hub with ``format=<name>`` gives the same inputs as its local directory:

* ``copa``: ``text`` = premise + the question as COPA's authors phrase it ("What was the CAUSE of
  this?" / "What happened as a RESULT?"), ``text_pair`` = ``"1) <choice1> 2) <choice2>"``; the label
  (choice1 / choice2) indexes the numbered alternatives.
* ``wic``: ``text`` = sentence1, ``text_pair`` = sentence2. Like ``shared/data/wic`` the target word
  is *not* in the input (that copy keeps it only in a side field); ``wic_word`` puts it in front
  (``"<word>: <sentence1>"``) for those who want the better-posed task.
* ``wsc``: ``text`` = the sentence, ``text_pair`` = ``"<pronoun> -> <candidate referent>"``
  (SuperGLUE ``span2_text -> span1_text``); the label says whether they co-refer.
* ``multirc``: ``text`` = paragraph, ``text_pair`` = ``"<question> || <candidate answer>"``; the
  label says whether the answer is correct.
* ``yahoo_answers``: single text, title, question body and best answer joined by spaces (empty
  parts skipped), as IBM's unitxt card for ``yahoo_answers_topics`` does.

Pure functions of a mapping (no ``datasets`` here): :mod:`tasks.hub` applies them with ``Dataset.map``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tasks.spec import TaskDataError

__all__ = ["FORMATTERS", "Formatter", "get_formatter"]

COPA_QUESTIONS = {"cause": "What was the CAUSE of this?", "effect": "What happened as a RESULT?"}


@dataclass(frozen=True)
class Formatter:
    """A named mapping raw row -> ``{"text": ..., ["text_pair": ...]}``, with the raw fields it reads."""

    name: str
    fields: tuple[str, ...]
    pair: bool
    fn: Callable[[Mapping[str, Any]], dict[str, str]]

    def __call__(self, row: Mapping[str, Any]) -> dict[str, str]:
        return self.fn(row)


def _copa(row: Mapping[str, Any]) -> dict[str, str]:
    question = COPA_QUESTIONS.get(str(row["question"]).strip().lower())
    if question is None:
        raise TaskDataError(f"format 'copa': question must be 'cause' or 'effect', got {row['question']!r}")
    return {"text": f"{row['premise']} {question}", "text_pair": f"1) {row['choice1']} 2) {row['choice2']}"}


def _wic(row: Mapping[str, Any]) -> dict[str, str]:
    return {"text": row["sentence1"], "text_pair": row["sentence2"]}


def _wic_word(row: Mapping[str, Any]) -> dict[str, str]:
    return {"text": f"{row['word']}: {row['sentence1']}", "text_pair": row["sentence2"]}


def _wsc(row: Mapping[str, Any]) -> dict[str, str]:
    return {"text": row["text"], "text_pair": f"{row['span2_text']} -> {row['span1_text']}"}


def _multirc(row: Mapping[str, Any]) -> dict[str, str]:
    return {"text": row["paragraph"], "text_pair": f"{row['question']} || {row['answer']}"}


def _yahoo_answers(row: Mapping[str, Any]) -> dict[str, str]:
    parts = (row["question_title"], row["question_content"], row["best_answer"])
    return {"text": " ".join(p.strip() for p in parts if p and p.strip())}


FORMATTERS: dict[str, Formatter] = {
    f.name: f
    for f in (
        Formatter("copa", ("premise", "question", "choice1", "choice2"), True, _copa),
        Formatter("wic", ("sentence1", "sentence2"), True, _wic),
        Formatter("wic_word", ("word", "sentence1", "sentence2"), True, _wic_word),
        Formatter("wsc", ("text", "span1_text", "span2_text"), True, _wsc),
        Formatter("multirc", ("paragraph", "question", "answer"), True, _multirc),
        Formatter("yahoo_answers", ("question_title", "question_content", "best_answer"), False, _yahoo_answers),
    )
}


def get_formatter(name: object) -> Formatter:
    """The formatter called ``name``; :class:`TaskDataError` naming it (and the known ones) if none."""
    if not isinstance(name, str) or name not in FORMATTERS:
        raise TaskDataError(f"unknown format {name!r}; known formats: {sorted(FORMATTERS)}")
    return FORMATTERS[name]
