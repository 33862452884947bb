"""The rollout-engine protocol: what the trainer asks of SGLang and of the CPU engine.

Owns ``SamplingParams``, ``GenerationRequest``, ``Sample``, the abstract ``RolloutEngine``, the
``WeightStream`` type (the bridge's buckets) and the weight-version check. Must not import
megatron, megatron_fipo.mcore, sglang or transformers: engines implement this in their own modules.

Conventions every engine follows:

* ``Sample.logprobs[i]`` is the log-probability of ``token_ids[i]`` under the distribution the
  engine sampled from *before* top-p / top-k truncation, i.e. ``log_softmax(logits / temperature)``.
  At the recipe's temperature 1.0 that is the policy's own log-prob, which the trainer compares
  with its recomputed one (``algo.mismatch``).
* The stop token that ended a sample is part of ``token_ids`` (and of the training response),
  as in SGLang's output ids; ``finish_reason`` is ``"stop"`` then, ``"length"`` when
  ``max_new_tokens`` ran out, ``"abort"`` when the engine gave up on the request.
* Sample ``j`` of a request with ``seed=s`` is drawn with seed ``s + j``: the same request with
  the same seed and weights reproduces its samples (the CPU engine bit for bit; SGLang when its
  deterministic sampling is enabled).
* ``generate_groups`` yields each request's group once, when its ``n`` samples are done
  (completion order); ``generate`` returns the same groups in request order.
* ``update_weights`` consumes the stream bucket by bucket and is done with a bucket's tensors
  before it asks for the next one (the bridge may reuse one buffer for every bucket), and returns
  only after the engine has applied them; the results of later ``generate`` calls carry
  ``version``.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

WeightStream = Iterable[Sequence[tuple[str, torch.Tensor]]]
FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request.

    Args:
        n: samples drawn for the prompt.
        temperature: > 0 (greedy decoding is not a policy sample and is not offered).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        max_new_tokens: hard cap on the response length (>= 1).
        stop_token_ids: tokens that end a sample (kept as its last token).
        seed: base seed (sample j uses ``seed + j``); None draws fresh randomness.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) and how to sample it."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        ids = tuple(int(t) for t in self.prompt_ids)
        if not ids:
            raise ValueError("a generation request needs at least one prompt token")
        object.__setattr__(self, "prompt_ids", ids)


@dataclass(frozen=True)
class Sample:
    """One sampled response.

    Attributes:
        prompt_ids: the request's prompt.
        token_ids: sampled token ids (the stop token included when ``finish_reason == "stop"``).
        logprobs: float log-prob of each sampled token (see the module docstring), same length.
        finish_reason: ``"stop"``, ``"length"`` or ``"abort"``.
        weight_version: version of the weights the sample was drawn with (the version of its first
            token when weights changed under it: in-flight updates, continued partial samples).
        request_index, sample_index: position of the request in the ``generate`` call and of the
            sample among its ``n``.
        token_versions: the weight version that produced each token; empty when every token is
            ``weight_version``'s (``versions()`` reads both).
    """

    prompt_ids: tuple[int, ...]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int
    request_index: int = 0
    sample_index: int = 0
    token_versions: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.token_versions and len(self.token_versions) != len(self.token_ids):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.token_versions)} token versions")

    def versions(self) -> list[int]:
        """The weight version of every token."""
        return list(self.token_versions) if self.token_versions else [self.weight_version] * len(self.token_ids)
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


class EngineError(RuntimeError):
    """A rollout engine failed (a dead server, an error answer, a stale weight version)."""


class RolloutEngine(abc.ABC):
    """A generator of policy samples whose weights the trainer updates in place.

    Usable as a context manager (``shutdown`` on exit). ``weight_version`` is the version of the
    weights the engine holds (``0`` for the weights it was created with).
    """

    weight_version: int = 0

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False) -> list[list[Sample]]:
        """Sample every request; returns ``n`` samples per request, in request order."""

    def generate_groups(self, requests: Sequence[GenerationRequest], *,
                        progress: bool = False) -> Iterator[tuple[int, list[Sample]]]:
        """Sample every request; yields ``(request index, its n samples)`` as each group completes.

        Every request is yielded once, in completion order, so a caller can score finished groups
        while others are still generating; the samples equal ``generate``'s. This default runs
        ``generate`` and yields in request order; engines that finish groups at different times
        override it.
        """
        yield from enumerate(self.generate(requests, progress=progress))

    @abc.abstractmethod
    def update_weights(self, stream: WeightStream, version: int) -> None:
        """Load the full HF state dict streamed as buckets of ``(hf_name, tensor)``; then serve ``version``."""

    def release(self) -> None:
        """Free the engine's accelerator memory (weights, KV cache) before a colocated training phase."""

    def resume(self) -> None:
        """Take the memory back after ``release`` (weights must be re-synced if they were released)."""

    @abc.abstractmethod
    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...}`` with engine-specific details (replicas, versions, errors)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and everything it started; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False


def check_weight_version(samples: Iterable[Iterable[Sample]], expected: int) -> None:
    """Raise ``EngineError`` if a sample was not drawn with weights ``expected`` (a missed sync)."""
    stale = sorted({s.weight_version for group in samples for s in group if s.weight_version != expected})
    if stale:
        raise EngineError(f"samples were generated with weight version(s) {stale}, expected {expected}: "
                          "the last weight sync did not reach the engine")


def validate_stream_names(seen: Sequence[str], expected: Iterable[str]) -> None:
    """Raise ``ValueError`` unless a weight stream carried each expected HF name exactly once."""
    expected = set(expected)
    dup = sorted({n for n in seen if seen.count(n) > 1}) if len(set(seen)) != len(seen) else []
    missing, unknown = sorted(expected - set(seen)), sorted(set(seen) - expected)
    if dup or missing or unknown:
        raise ValueError(f"weight stream does not match the engine's model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}, duplicated {dup[:5]}")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (a no-op object when ``enabled`` is False); use as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True, leave=False)
