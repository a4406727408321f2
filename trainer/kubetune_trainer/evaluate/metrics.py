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
# Claims a model can invent: numbers (with optional sign, decimals, thousands separators)
# and capitalised words (names, places, brands).
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?")
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z]+\b")
_ANY_WORD = re.compile(r"[A-Za-z]+")
# What may precede a sentence-initial word: the start, an end of sentence (. ! ?) or a line
# break (with a list marker), then opening quotes or brackets. Not ":" ("Capital: Paris").
_SENTENCE_START = re.compile(r"(?:\A|[.!?]\s+|\n\s*(?:[-*•]\s+|\d+[.)]\s+)?)[\"'(\[]*\Z")


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
    """Claims (numbers, capitalised words) in an output and those found in no source."""

    claims: int
    unsupported: tuple[str, ...]


def unsupported_content(prediction: str, *sources: str) -> UnsupportedContent:
    """Numbers and names (capitalised words inside a sentence) of `prediction` that appear
    in none of `sources`.

    A hallucination PROXY, not a fact check: a number or a name the model wrote that is in
    neither the prompt nor the reference was not given to it, so it is more likely invented.
    A word is capitalised at the start of a sentence, a line or a list item whatever it is
    ("However", "Yes", "The"), so there it is not taken for a name: a name opening a
    sentence is missed, a name inside one is not. A true fact the reference does not mention
    counts as unsupported too, and an invented lower-case claim is not seen. Words match
    case-insensitively; numbers match by value.
    """
    source_text = " ".join(sources)
    source_numbers = {_number_key(n) for n in _NUMBER.findall(source_text)}
    source_words = {w.lower() for w in _ANY_WORD.findall(source_text)}
    numbers = _NUMBER.findall(prediction)
    words = [
        match.group()
        for match in _CAPITALISED.finditer(prediction)
        if not _SENTENCE_START.search(prediction[: match.start()])
    ]
    unsupported = [n for n in numbers if _number_key(n) not in source_numbers]
    unsupported += [w for w in words if w.lower() not in source_words]
    return UnsupportedContent(claims=len(numbers) + len(words), unsupported=tuple(unsupported))


def unsupported_content_rate(findings: Iterable[UnsupportedContent]) -> float | None:
    """Unsupported claims over all claims (pooled over examples); None when there were none."""
    findings = list(findings)
    claims = sum(f.claims for f in findings)
    if claims == 0:
        return None
    return sum(len(f.unsupported) for f in findings) / claims


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; None for no values (a metric that was not measured)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy), capped below float overflow for a diverged model."""
    if loss is None:
        return None
    return math.exp(min(loss, 700.0))
