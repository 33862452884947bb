"""Verifiable math rewards, and a process pool that scores them with a per-item time bound.

Owns ``dapo_math_reward`` (DAPO's reward, ``docs/algorithm.md``, "Around the loss": last ``Answer:`` in
the final 300 characters, Minerva-style normalisation, exact match, +1 / -1), ``boxed_math_reward``
(last ``\\boxed{}``, equivalence checked by math-verify), their normaliser / extractors, and
``RewardPool`` / ``score_batch``, which run a reward in spawned workers.

Imports the stdlib and math-verify only: no torch, no torch.distributed, no config objects.

Hostile output is safe: nothing is ``eval``-ed, regexes are linear or run on bounded strings,
and scans are bounded.

Departs from verl's ``reward_score/math_dapo.py`` (whose behaviour it re-implements): the
*last* ``Answer:`` wins even within one line (verl's ``findall`` reads
``"Answer: 3. Final Answer: 5"`` as ``"3.FinalAnswer:5"``) and a bare trailing marker is
skipped; only well-formed thousands groupings lose their commas (verl: ``"1,2" -> "12"``);
added ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, ``\\%``, ``\\(``/``\\[``, ``$$``, a
trailing ``.``, ``\\frac1{2}``/``\\frac{1}2``, ``2.0 -> 2``, ``2.50 -> 2.5``; unit words go
only as whole words and English articles stay (verl strips any substring, ``"a "``, ``"an "``);
an empty prediction is never correct.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import Callable

import math_verify

INVALID, TIMEOUT, ERROR = "[INVALID]", "[TIMEOUT]", "[ERROR]"
NO_ANSWER_PREDS = frozenset({INVALID, TIMEOUT, ERROR, ""})  # never vote in metrics.cons_at_k
DAPO_TAIL_CHARS = 300  # DAPO searches only the end of the response for ``Answer:``
MAX_BOXED_CHARS = 1000  # longer \boxed{} contents score -1 unparsed
MAX_BOXED_DEPTH = 10  # deeper {} nesting scores -1 unparsed (math-verify is exponential in it)
_BOOT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RewardResult:
    """Outcome of one reward: ``score`` +1.0 / -1.0, ``acc`` (correct), ``pred`` (normalised
    extracted answer, or ``[INVALID]`` / ``[TIMEOUT]`` / ``[ERROR]``)."""

    score: float
    acc: bool
    pred: str


def make_result(correct: bool, pred: str) -> RewardResult:
    return RewardResult(1.0 if correct else -1.0, bool(correct), pred)


# ----------------------------------------------------------------------------- normalisation
_DOLLARS = (("\\$", ""), ("$$", "$"))  # escaped dollars, then display math as inline math
_REPLACEMENTS = (
    ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
    ("\\mbox", "\\text"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", ""), ("\\text{s}", ""),
    ("\\text{.}", ""), ("\\text{}", ""), ("\\mathrm{th}", ""), ("^{\\circ}", ""), ("^\\circ", ""),
    ("{,}", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("\\%", ""),
    ("\\ldots", ""), ("\\dots", ""), ('"', ""),
)
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|overline)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"(?<![A-Za-z])(?:square|ways|integers|dollars?|mph|inch(?:es)?|hours?|km|units?|points?|feet"
    r"|foot|minutes?|digits?|cents?|degrees?|cm|gm|pounds?|meters?|meals|edges|students"
    r"|multiples)(?![A-Za-z])"
)
_WHITESPACE = re.compile(r"\s+")
_SHORTHANDS = (  # \frac12, \frac1{2}, \frac{1}2, \sqrt2
    (re.compile(r"\\frac([0-9A-Za-z])([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac([0-9A-Za-z])(?=\{)"), r"\\frac{\1}"),
    (re.compile(r"\\frac\{([^{}]*)\}([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt([0-9A-Za-z])"), r"\\sqrt{\1}"),
)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?\d+\.\d+")


def normalize_final_answer(answer: str) -> str:
    """Minerva-style normalisation of a final answer, in linear time.

    Keeps the text after the last ``=`` and inside the first ``$...$``; drops ``\\boxed{}``,
    ``\\text{}``-like wrappers, unit words, spacing macros, ``\\left``/``\\right``, degree
    marks, whitespace and trailing dots; ``\\frac12 -> \\frac{1}{2}``, ``\\sqrt2 -> \\sqrt{2}``,
    ``\\dfrac``/``\\tfrac -> \\frac``, ``1,000 -> 1000``, ``2.0 -> 2``.

    Args:
        answer: raw answer text.

    Returns:
        The normalised string (possibly empty).
    """
    s = answer.split("=")[-1]
    for old, new in _DOLLARS:
        s = s.replace(old, new)
    start = s.find("$")
    end = s.find("$", start + 1) if start >= 0 else -1
    if end >= 0:
        s = s[start + 1:end]
    s = s.replace("$", "")
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _LEFT_RIGHT.sub("", s)
    boxed = last_boxed_content(s)
    s = _TEXT_WRAP.sub(r"\1", s if boxed is None else boxed)
    s = _WHITESPACE.sub("", _UNIT_WORDS.sub("", s))
    for pattern, replacement in _SHORTHANDS:
        s = pattern.sub(replacement, s)
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        s = s.rstrip("0").rstrip(".")
    return s


# ----------------------------------------------------------------------------- extraction
_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_last_answer(text: str) -> str | None:
    """The rest of the line after the last ``Answer:`` marker (case-insensitive) that has any.

    Whitespace after the colon, newlines included, is skipped (as ``Answer\\s*:\\s*([^\\n]+)``).

    Args:
        text: where to search; callers bound its length (DAPO: the final 300 characters).

    Returns:
        That line, or None if no marker is followed by non-blank text.
    """
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        line = text[marker.end():].lstrip().split("\n", 1)[0]
        if line:
            return line
    return None


def last_boxed_content(text: str, *, max_chars: int = 100_000, max_depth: int | None = None) -> str | None:
    """Content of the last ``\\boxed{...}``, by a brace-balanced scan of at most ``max_chars``.

    Args:
        text: where to search.
        max_chars: content longer than this (or unclosed) gives None.
        max_depth: content with ``{}`` nested deeper than this gives None (None: no limit).

    Returns:
        The text between the braces, or None.
    """
    begin = text.rfind("\\boxed{")
    if begin < 0:
        return None
    begin += len("\\boxed{")
    depth, limit = 1, len(text) if max_depth is None else max_depth + 1
    for pos in range(begin, min(len(text), begin + max_chars + 1)):
        char = text[pos]
        if char == "{":
            depth += 1
            if depth > limit:
                return None
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:pos]
    return None


def as_text(value: object, name: str, *, allow_numbers: bool = False) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{name} must be a str (or UTF-8 bytes), got {type(value).__name__}")


# ----------------------------------------------------------------------------- rewards
def dapo_math_reward(response: str, ground_truth: str) -> RewardResult:
    """DAPO's math reward: last ``Answer:`` of the final 300 characters, normalised, exact match.

    Args:
        response: decoded model output (bytes are decoded as UTF-8 with replacement).
        ground_truth: reference answer (str or number), normalised the same way.

    Returns:
        ``RewardResult``: score +1 / -1, acc, pred (normalised answer or ``[INVALID]``).
    """
    tail = as_text(response, "response")[-DAPO_TAIL_CHARS:]
    gold = normalize_final_answer(as_text(ground_truth, "ground_truth", allow_numbers=True))
    answer = extract_last_answer(tail)
    if answer is None:
        return make_result(False, INVALID)
    pred = normalize_final_answer(answer)
    return make_result(bool(pred) and pred == gold, pred)


def boxed_math_reward(response: str, ground_truth: str, *, timeout_s: float = 5.0) -> RewardResult:
    """Last ``\\boxed{}`` of the response, checked for equivalence with math-verify.

    math-verify bounds its parse and compare steps with ``signal.alarm`` (``ceil(timeout_s)``
    each), which works only in a process's main thread; elsewhere those bounds are off
    (``parsing_timeout=None, timeout_seconds=None``) and time is bounded by the size caps
    ``MAX_BOXED_CHARS`` / ``MAX_BOXED_DEPTH`` and, in a ``RewardPool``, by killing the worker.

    Args:
        response: decoded model output.
        ground_truth: reference answer (LaTeX or plain; wrapped in ``\\boxed{}`` to parse).
        timeout_s: per-step bound of math-verify in the main thread, seconds (> 0).

    Returns:
        ``RewardResult``; pred is the normalised boxed content or ``[INVALID]``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    text = as_text(response, "response")
    content = last_boxed_content(text, max_chars=MAX_BOXED_CHARS, max_depth=MAX_BOXED_DEPTH)
    gold_text = as_text(ground_truth, "ground_truth", allow_numbers=True)
    if content is None or not content.strip():
        return make_result(False, INVALID)
    pred = normalize_final_answer(content) or content.strip()
    seconds = math.ceil(timeout_s) if threading.current_thread() is threading.main_thread() else None
    try:
        gold = math_verify.parse("\\boxed{" + gold_text + "}", parsing_timeout=seconds)
        target = math_verify.parse("\\boxed{" + content + "}", parsing_timeout=seconds)
        correct = bool(gold and target) and math_verify.verify(gold, target, timeout_seconds=seconds)
    except Exception:  # math-verify swallows most errors; anything left means "not verified"
        correct = False
    return make_result(correct, pred)


REWARD_FNS: dict[str, Callable[..., RewardResult]] = {
    "dapo_math": dapo_math_reward,
    "boxed_math": boxed_math_reward,
}
