"""The CPU rollout engine: batched sampling with a KV cache on transformers' Qwen2, fed by the weight bridge.

Owns ``CPUEngine``, the engine of the embedded CPU demo and of every CPU end-to-end test, and the
per-row sampler (``sample_rows``, ``row_generator``) the CPU server's batcher shares. Must not import
megatron, megatron_fipo.mcore or sglang.

How it samples: the ``n`` rows of every request are sorted by prompt length and run in batches
of at most ``max_batch_rows``; prompts are left-padded with an attention mask and explicit
position ids (``cumsum(mask) - 1``), so a padded row computes what an unpadded forward of the
same sequence computes; finished rows leave the batch and the KV cache
(``DynamicCache.batch_select_indices``). Each step takes the last logits in fp32, divides by the
temperature, and reports ``log_softmax`` of that full distribution at the sampled token (the
protocol's convention), while the token itself is drawn after top-k then top-p truncation. Every
row draws from its own ``torch.Generator`` seeded ``seed + sample_index``, so its samples do not
depend on the other rows of its batch.

Weight updates (``WeightUpdate``, fed one bucket at a time: by ``update_weights`` from a stream,
by ``cpu_server`` from one HTTP request after another) copy each streamed HF tensor into the
matching parameter before the next bucket is requested (the bridge reuses one buffer) and check
that every parameter arrived once.
``release`` / ``resume`` have no accelerator memory to free here; they only gate ``generate``, so
a colocated loop that forgets ``resume`` fails here as it would on GPUs.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from megatron_fipo import quiet_warnings
from megatron_fipo.rollout.engine import (
    EngineError,
    GenerationRequest,
    RolloutEngine,
    Sample,
    WeightStream,
    progress_bar,
    validate_stream_names,
)


class CPUEngine(RolloutEngine):
    """Rollouts from an HF ``Qwen2ForCausalLM`` on CPU.

    Args:
        model_dir: HF checkpoint directory (``from_pretrained``); or pass ``model``.
        model: an already built causal LM (e.g. in tests).
        dtype: parameter dtype when loading ``model_dir``.
        max_batch_rows: sample rows decoded together.
    """

    def __init__(self, model_dir: str | None = None, *, model=None, dtype: torch.dtype = torch.float32,
                 max_batch_rows: int = 64):
        if (model_dir is None) == (model is None):
            raise ValueError("pass exactly one of model_dir or model")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        quiet_warnings.install()  # transformers' notice of its cache argument's rename, once per generation
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.max_batch_rows = max_batch_rows
        self.weight_version = 0
        self._released = self._partial = False

    # ------------------------------------------------------------------ protocol
    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False) -> list[list[Sample]]:
        """Sample every request (see the module docstring); ``n`` samples per request, in order."""
        self._check_usable()
        for i, req in enumerate(requests):
            self._validate(i, req)
        rows = [(ri, j) for ri, req in enumerate(requests) for j in range(req.params.n)]
        rows.sort(key=lambda r: len(requests[r[0]].prompt_ids))
        out: list[list] = [[None] * req.params.n for req in requests]
        with progress_bar(len(rows), "generate", progress) as bar:
            for start in range(0, len(rows), self.max_batch_rows):
                chunk = rows[start:start + self.max_batch_rows]
                for (ri, j), (tokens, logps, reason) in zip(chunk, self._decode_batch(requests, chunk)):
                    out[ri][j] = Sample(requests[ri].prompt_ids, tokens, logps, reason, self.weight_version, ri, j)
                bar.update(len(chunk))
        return out

    def update_weights(self, stream: WeightStream, version: int) -> None:
        """Copy the streamed HF tensors into the model; ``version`` is served afterwards."""
        update = self.begin_update()
        for bucket in stream:
            update.load(bucket)
        update.finish(version)

    def begin_update(self) -> "WeightUpdate":
        """Start a weight update fed one bucket at a time (``update_weights`` and the CPU server use it).

        From here until ``WeightUpdate.finish`` the model holds a mix of versions and ``generate`` refuses.
        """
        self._check_alive()
        return WeightUpdate(self)

    def release(self) -> None:
        self._check_alive()
        self._released = True

    def resume(self) -> None:
        self._check_alive()
        self._released = False

    def health(self) -> dict:
        return {"ok": self.model is not None and not self._released and not self._partial,
                "weight_version": self.weight_version,
                "device": "cpu", "released": self._released, "alive": self.model is not None}

    def shutdown(self) -> None:
        self.model = None

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self.model is None:
            raise EngineError("the CPU engine was shut down")

    def _check_usable(self) -> None:
        self._check_alive()
        if self._released:
            raise EngineError("the CPU engine's memory is released (colocated training phase): call resume() first")
        if self._partial:
            raise EngineError(f"the last weight update failed part-way: the model holds a mix of versions; "
                              f"a complete update is needed (last complete version {self.weight_version})")

    def _validate(self, i: int, req: GenerationRequest) -> None:
        if not isinstance(req, GenerationRequest):
            raise ValueError(f"request {i} is a {type(req).__name__}, not a GenerationRequest")
        bad = [t for t in req.prompt_ids + req.params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {i}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if len(req.prompt_ids) + req.params.max_new_tokens > self.max_positions:
            raise ValueError(f"request {i}: prompt ({len(req.prompt_ids)}) + max_new_tokens "
                             f"({req.params.max_new_tokens}) exceeds the model's {self.max_positions} positions")

    @torch.no_grad()
    def _decode_batch(self, requests, rows) -> list[tuple[list[int], list[float], str]]:
        from transformers import DynamicCache

        reqs = [requests[ri] for ri, _ in rows]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[b, width - len(r.prompt_ids):] = 1
        sampler = _RowSampler([r.params for r in reqs], [j for _, j in rows])
        live = list(range(len(rows)))  # batch position -> row
        results = [([], [], "length") for _ in rows]
        cache, positions = DynamicCache(), (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True).logits[:, -1].float()
        while live:
            token, logp = sampler.sample(logits, live)
            keep = []
            for b, row in enumerate(live):
                tokens, logps, _ = results[row]
                tokens.append(int(token[b]))
                logps.append(float(logp[b]))
                p = reqs[row].params
                if tokens[-1] in p.stop_token_ids:
                    results[row] = (tokens, logps, "stop")
                elif len(tokens) < p.max_new_tokens:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask, positions, token = mask[index], positions[index], token[index]
                live = [live[b] for b in keep]
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()
        return results


class WeightUpdate:
    """One weight update of a ``CPUEngine``: buckets of ``(hf_name, tensor)`` copied in as they come.

    ``load`` rejects a name the model does not have, a name already loaded in this update and a
    shape mismatch at once; ``finish`` rejects a missing one, then serves ``version``.
    """

    def __init__(self, engine: CPUEngine):
        self.engine = engine
        self.params = dict(engine.model.named_parameters())
        self.seen: list[str] = []
        engine._partial = True  # until the update is complete the weights are a mix: generate refuses

    def load(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Copy one bucket into the model (the tensors may be reused by the caller afterwards)."""
        self.engine._check_alive()
        done = set(self.seen)
        for name, tensor in bucket:
            target = self.params.get(name)
            if target is None or name in done:
                raise ValueError(f"weight stream does not match the engine's model: "
                                 f"{'unknown' if target is None else 'duplicated'} weight {name!r}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"weight {name!r}: streamed shape {tuple(tensor.shape)}, "
                                 f"model shape {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            self.seen.append(name)
            done.add(name)

    def missing(self) -> list[str]:
        """The model's parameters this update has not loaded yet."""
        done = set(self.seen)
        return [n for n in self.params if n not in done]

    def finish(self, version: int) -> None:
        """Check that every parameter arrived once; the engine then serves ``version``."""
        validate_stream_names(self.seen, self.params)
        self.engine.weight_version = int(version)
        self.engine._partial = False


class _RowSampler:
    """Per-row temperature / top-k / top-p sampling with one generator per row."""

    def __init__(self, params, sample_indices):
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
        self.top_k = torch.tensor([p.top_k for p in params])[:, None]
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)[:, None]
        self.generators = [row_generator(p, j) for p, j in zip(params, sample_indices)]

    def sample(self, logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B]`` and their log-probs under ``log_softmax(logits / T)`` for batch rows ``rows``."""
        index = torch.tensor(rows)
        return sample_rows(logits, self.temperature[index], self.top_k[index], self.top_p[index],
                           [self.generators[r] for r in rows])


def row_generator(params, sample_index: int) -> torch.Generator:
    """The generator of sample ``sample_index`` of a request: seeded ``seed + sample_index`` (fresh without a seed)."""
    seed = params.seed + sample_index if params.seed is not None else random.SystemRandom().randrange(1 << 62)
    return torch.Generator().manual_seed(seed % (1 << 63))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits [B, V]`` and its log-prob under ``log_softmax(logits / T)``.

    ``temperature``, ``top_k`` (0 = off) and ``top_p`` are ``[B, 1]``; row ``b`` draws once from
    ``generators[b]`` after top-k then top-p truncation, so its token depends only on its own logits and
    generator (the CPU server's batcher samples its running requests with this too).
    """
    scaled = logits / temperature
    full_logp = torch.log_softmax(scaled, dim=-1)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1])[None, :]
    drop = (top_k > 0) & (rank >= top_k)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    drop |= (before >= top_p) & (top_p < 1)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    picks = torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])
    token = order.gather(1, picks[:, None])[:, 0]
    return token, full_logp.gather(1, token[:, None])[:, 0]
