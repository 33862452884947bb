"""What the CPU server reports about a request besides its tokens: weight-version spans and prefix-cache hits.

Owns ``version_spans`` and ``versions_meta`` (SGLang 0.5's ``meta_info.weight_versions``) and
``PrefixCache`` (the ``cached_tokens`` counters). Standard library only; must not import sglang.

Weight-version spans (the model of the pinned wheel's ``sglang/srt/utils/weight_versions.py``,
written here from its described behaviour): when the served version changes from ``old`` to a new
one, every live request (running or waiting) that already has ``k`` output tokens records the
event ``(old, k)``: its first ``k`` tokens were drawn with ``old``. When the request ends, the
events plus ``(current version, number of output tokens)`` become runs ``{"version", "start",
"end"}`` (``end`` exclusive): each change point, capped at the output length, closes a run; a point
that does not move past the previous run's end adds nothing, and one with the version of the
previous run extends it. The answer keeps the runs that start inside the output (and the first
one always, so an empty output still names its version), each ``end`` capped at the output
length, and ``weight_version`` is the version of the last run.

Prefix-cache model (for counting, not for speed: the CPU server always computes the full
prefill): the cache holds every token sequence whose KV the server computed since the last flush
- each prompt when it is prefilled, and ``prompt + output[:-1]`` when a request ends (SGLang
inserts finished requests into its radix tree; the last output token is never fed). A new prompt
reports as cached the longest common prefix with any of them (a radix-tree match), at most its
own length; it costs the rest as prefill tokens. A continuation, ``prompt + partial response``,
therefore hits the prompt and the part of the response its first run computed. ``/flush_cache``,
a weight update with ``flush_cache``, and a memory release empty the cache.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def version_spans(events: Sequence[tuple[str, int]], current: str, num_tokens: int) -> list[dict[str, Any]]:
    """Runs ``[{"version", "start", "end"}]`` of a request's ``num_tokens`` output tokens (module docstring).

    ``events`` are ``(old version, output tokens at the change)`` in the order the changes happened;
    ``current`` is the version served when the request ended.
    """
    runs: list[dict[str, Any]] = []
    for version, point in [*events, (current, num_tokens)]:
        point = min(point, num_tokens)
        if runs and point <= runs[-1]["end"]:
            continue  # no token was drawn with this version
        if runs and runs[-1]["version"] == version:
            runs[-1]["end"] = point
        else:
            runs.append({"version": version, "start": runs[-1]["end"] if runs else 0, "end": point})
    return runs


def versions_meta(spans: Sequence[dict[str, Any]], num_tokens: int) -> dict[str, Any]:
    """``{"weight_versions": [...], "weight_version": ...}`` for an answer's ``meta_info``."""
    shown = [dict(s, end=min(s["end"], num_tokens)) for s in spans if s["start"] == 0 or s["start"] < num_tokens]
    return {"weight_versions": shown, "weight_version": shown[-1]["version"]}


class PrefixCache:
    """The token sequences whose KV the server computed, as a trie; counts cached and prefilled tokens.

    ``sequences`` is how many distinct sequences were inserted since the last ``clear``.
    """

    def __init__(self):
        self.root: dict = {}
        self.sequences = 0
        self.prefill_tokens = self.cached_tokens = 0

    def match(self, tokens: Sequence[int]) -> int:
        """The length of the longest prefix of ``tokens`` the cache holds."""
        node, n = self.root, 0
        for t in tokens:
            node = node.get(t)
            if node is None:
                break
            n += 1
        return n

    def insert(self, tokens: Sequence[int]) -> None:
        node = self.root
        for t in tokens:
            node = node.setdefault(t, {})
        if tokens and None not in node:  # None marks the end of an inserted sequence
            node[None] = True
            self.sequences += 1

    def prefill(self, tokens: Sequence[int]) -> int:
        """Account one prompt's prefill: returns its cached prefix length and inserts it."""
        cached = self.match(tokens)
        self.cached_tokens += cached
        self.prefill_tokens += len(tokens) - cached
        self.insert(tokens)
        return cached

    def clear(self) -> None:
        self.root, self.sequences = {}, 0
