"""Word error rate with a normaliser fit for comparing Whisper to references
(case, punctuation and digits-vs-words differences are not errors)."""

from __future__ import annotations

import re

import jiwer
from num2words import num2words

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def _spell_number(match: re.Match[str]) -> str:
    token = match.group(0)
    try:
        if len(token) == 4 and token.isdigit() and 1100 <= int(token) <= 2099:
            return num2words(int(token), to="year")
        return num2words(float(token) if "." in token else int(token))
    except (ValueError, OverflowError):
        return token


def normalize(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = _NUMBER.sub(_spell_number, text)
    text = text.replace("-", " ").replace(",", " ")
    text = _NON_WORD.sub(" ", text)
    text = text.replace("'", "")
    return " ".join(text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref = normalize(reference)
    hyp = normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp if hyp else ""))


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Pooled WER over many utterances (errors / reference words)."""
    if not pairs:
        # jiwer scores nothing against nothing as 0.0: a perfect score for
        # a run that decoded no utterance.
        raise ValueError("corpus_wer: no utterances to score")
    refs = [normalize(r) for r, _ in pairs]
    hyps = [normalize(h) for _, h in pairs]
    return float(jiwer.wer(refs, hyps))
