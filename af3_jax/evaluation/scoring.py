"""The benchmarks' scoring rules, restated from their official scorers, and the summaries built on them.

Multiple choice (MMAU, MMAR): `string_match` of `evaluation.py` in Sakshi113/MMAU (commit 7468292, Jan
2025) and `code/evaluation.py` in ddlBoJack/MMAR, the same function in both. Both scorers skip an item
that has no prediction key at all, so accuracy is over the items that have one.
ASR: Whisper's English text normalizer (the `whisper-normalizer` package) on both sides, then jiwer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"\b\w+\b")
# How AF3 frames a transcript (transformers' `AudioFlamingo3Processor.decode(strip_prefix=True)` removes
# the same prefixes, one trailing full stop and one pair of matching quotes).
_ASR_PREFIXES = ("The spoken content of the audio is", "The transcription of the audio is",
                 "The content of the input audio is")


def words(text: str) -> set[str]:
  """The official scorers' `tokenize`: the distinct runs of word characters of the lowercased text
  (Python's Unicode `\\w`, so "push-ups" is {"push", "ups"} and "(A)" is {"a"})."""
  return set(_WORD.findall(text.lower()))


def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
  """MMAU's and MMAR's rule: every word of the answer is in the prediction, and no word that belongs
  only to another choice is. A choice whose word set equals the answer's is not "another choice"; words
  another choice shares with the answer do not count against it. An empty prediction is wrong."""
  said = words(prediction)
  if not said:
    return False
  right = words(answer)
  others = [words(c) for c in choices]
  wrong = set().union(*(w - right for w in others if w != right))
  return right <= said and said.isdisjoint(wrong)


def named_choices(prediction: str, choices: Sequence[str]) -> list[int]:
  """The indices of the choices all of whose words the prediction holds (a diagnostic, not a score:
  an answer that names none, such as a bare letter, is what the string match cannot credit)."""
  said = words(prediction)
  return [i for i, c in enumerate(choices) if (w := words(c)) and w <= said]


def _group_key(value) -> str:
  """A breakdown key: MMAU test-mini has some categories as one-element lists (["Reasoning"])."""
  return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _percent(hits: int, total: int) -> float | None:
  return hits / total * 100 if total else None  # the scorers' (corr / total) * 100


def choice_summary(records: Sequence[dict], answer_key: str, breakdowns: Sequence[str]) -> dict:
  """Accuracy by the string match over the records holding `answer_key`, broken down by each field in
  `breakdowns` (records lacking a field are left out of that breakdown, as the scorers do for
  sub-category), with the count of answers naming no choice or several."""
  scored = [r for r in records if answer_key in r]
  hits = [string_match(r["answer"], r[answer_key] or "", r["choices"]) for r in scored]
  named = [len(named_choices(r[answer_key] or "", r["choices"])) for r in scored]
  out = {"accuracy": _percent(sum(hits), len(hits)), "n": len(hits), "correct": sum(hits),
         "no_choice_named": named.count(0), "several_choices_named": sum(n > 1 for n in named)}
  for field in breakdowns:
    groups: dict[str, list[bool]] = {}
    for r, hit in zip(scored, hits):
      if field in r:
        groups.setdefault(_group_key(r[field]), []).append(hit)
    out[f"by_{field}"] = {k: {"accuracy": _percent(sum(v), len(v)), "n": len(v)} for k, v in sorted(groups.items())}
  return out


@functools.cache
def _normalizer():
  from whisper_normalizer.english import EnglishTextNormalizer

  return EnglishTextNormalizer()


def normalize(text: str) -> str:
  """Whisper's English normalizer: lowercase, punctuation and fillers out, numbers as digits
  ("twenty-five" -> "25"), British spellings American ("colour" -> "color")."""
  return _normalizer()(text)


def transcript(answer: str) -> str:
  """The transcript inside AF3's framing `The spoken content of the audio is "...".`, or the answer."""
  text = answer.strip()
  for prefix in _ASR_PREFIXES:
    if text.startswith(prefix):
      text = text[len(prefix):].strip()
      break
  text = text.removesuffix(".").strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].strip()
  return text


def wer_summary(pairs: Iterable[tuple[str, str]]) -> dict:
  """WER in percent over (reference, answer) pairs, both normalized (the answer's framing removed first).

  `wer` is the corpus WER: all substitutions, deletions and insertions over all reference words
  (micro-averaged). Per-sample mean, median and 95th percentile are over samples whose normalized
  reference has words: an empty reference has no WER of its own (its answer's words still count as
  insertions in the corpus WER), and `empty_references` counts them."""
  import jiwer

  refs, hyps = [], []
  for reference, answer in pairs:
    refs.append(normalize(reference))
    hyps.append(normalize(transcript(answer)))
  out = {"n": len(refs), "empty_references": sum(not r.split() for r in refs)}
  if not refs:
    return {**out, "wer": None}
  corpus = jiwer.process_words(refs, hyps)
  reference_words = corpus.hits + corpus.substitutions + corpus.deletions
  errors = corpus.substitutions + corpus.deletions + corpus.insertions
  per_sample = [jiwer.process_words(r, h).wer * 100 for r, h in zip(refs, hyps) if r.split()]
  stats = {"mean": float(np.mean(per_sample)), "median": float(np.median(per_sample)),
           "p95": float(np.percentile(per_sample, 95))} if per_sample else None
  return {**out, "wer": _percent(errors, reference_words), "reference_words": reference_words,
          "substitutions": corpus.substitutions, "deletions": corpus.deletions, "insertions": corpus.insertions,
          "per_sample_wer": stats}


def match_summary(pairs: Iterable[tuple[str, str]], normalized: bool) -> dict:
  """Percent of (reference, answer) pairs equal after Whisper's normalizer (`normalized`) or after
  stripping surrounding whitespace only (exact match)."""
  clean = normalize if normalized else str.strip
  hits = [clean(reference) == clean(answer) for reference, answer in pairs]
  return {"accuracy" if normalized else "exact_match": _percent(sum(hits), len(hits)), "n": len(hits),
          "correct": sum(hits)}
