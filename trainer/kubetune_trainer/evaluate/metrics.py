"""Task metrics on generated text: pure functions of (prediction, reference[, prompt]).

Each per-example function returns a number in [0, 1]; `mean` aggregates them. They follow the
usual definitions so numbers are comparable with other tools: exact match after whitespace
normalisation, SQuAD's bag-of-tokens F1, and ROUGE-L's LCS F-measure.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"[a-z0-9]+")
# Content of an answer: numbers (with optional sign, decimals, thousands separators) and
# words (letters of any script) that are not function words.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?")
_LETTERS = re.compile(r"[^\W\d_]+")
# A list item's marker ("1.", "2)", "a)", "-", "*", "•") numbers the answer's layout, it
# states nothing: removed before the answer's content is read.
_LIST_MARKER = re.compile(r"^[ \t]*(?:[-*•]|\d{1,3}[.)]|[A-Za-z][.)])[ \t]+", re.MULTILINE)
# English function words: they carry no claim, so they count neither way.
FUNCTION_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we
    were what when where which while who whom why will with would you your yours yourself
    yourselves s t don yes ok okay also""".split()  # noqa: SIM905 (a word list reads best as text)
)


def normalize_whitespace(text: str) -> str:
    """`text` with surrounding whitespace removed and inner runs folded into one space."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both are equal after whitespace normalisation (case and punctuation count)."""
    return float(normalize_whitespace(prediction) == normalize_whitespace(reference))


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, then split."""
    text = text.lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over the bags of normalised tokens of both texts."""
    predicted, expected = squad_tokens(prediction), squad_tokens(reference)
    if not predicted or not expected:
        # Both empty is a perfect answer to an empty reference; one empty shares nothing.
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's default tokenisation: lower case, runs of letters and digits."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if item == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1): harmonic mean of LCS precision and LCS recall."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    lcs = lcs_length(predicted, expected)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def _number_key(text: str) -> str:
    # "1,200" and "1200.0" state the same number.
    try:
        return repr(float(text.replace(",", "")))
    except ValueError:
        return text


@dataclass(frozen=True)
class UnsupportedContent:
    """The content items (numbers, non-function words) of one answer and those found in no
    source."""

    claims: int
    unsupported: tuple[str, ...]

    @property
    def rate(self) -> float | None:
        """Share of the answer's content found in no source; None for an answer without
        content (empty, or function words only)."""
        return len(self.unsupported) / self.claims if self.claims else None


def _content(text: str) -> tuple[list[str], list[str]]:
    """(numbers, words) of `text`: words lower-cased, function words and list markers left out."""
    text = _LIST_MARKER.sub("", text)
    numbers = _NUMBER.findall(text)
    words = [
        word
        for word in (w.lower() for w in _LETTERS.findall(_NUMBER.sub(" ", text)))
        if word not in FUNCTION_WORDS
    ]
    return numbers, words


def unsupported_content(prediction: str, *sources: str) -> UnsupportedContent:
    """The content of `prediction` (its numbers and non-function words) that appears in none
    of `sources` (the prompt and the reference).

    A hallucination PROXY, not a fact check, and lexical: content the model wrote that it was
    not given is more likely invented. A list's numbering is layout, not content. A true fact
    the sources do not mention, a synonym or another inflection ("cities" for "city") counts
    as unsupported; a false statement made of supported words ("Alice lives in Lima" when the
    prompt names both but she lives in Oslo) is not seen. Words match case-insensitively,
    numbers by value; the function-word list is English.
    """
    source_text = "\n".join(sources)
    source_numbers = {_number_key(n) for n in _NUMBER.findall(source_text)}
    source_words = {w.lower() for w in _LETTERS.findall(source_text)}
    numbers, words = _content(prediction)
    unsupported = [n for n in numbers if _number_key(n) not in source_numbers]
    unsupported += [w for w in words if w not in source_words]
    return UnsupportedContent(claims=len(numbers) + len(words), unsupported=tuple(unsupported))


def unsupported_content_rate(findings: Iterable[UnsupportedContent]) -> float | None:
    """Mean over answers of the share of each answer's content found in no source: every
    answer with content weighs the same, however long. None when no answer had content."""
    return mean(f.rate for f in findings if f.rate is not None)


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; None for no values (a metric that was not measured)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy), capped below float overflow for a diverged model."""
    if loss is None:
        return None
    return math.exp(min(loss, 700.0))
