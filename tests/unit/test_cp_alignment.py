"""One CP-alignment rule: config validation, the actor's micro-batch plan and the CP layout agree.

For cp 1-4, tp 1-4 and sequence parallelism on / off: the budget check pads a sequence to
``conventions.cp_alignment``, the actor's plan (``mcore.micro_batches.plan``) pads every sequence
it cuts to that multiple, and ``parallel.cp_layout.build_cp_layout`` pads to it by default.
"""

import types

import pytest
import torch

from megatron_fipo.config.conventions import cp_alignment

LAYOUTS = [(cp, tp, sp) for cp in range(1, 5) for tp in range(1, 5) for sp in (False, True)]


def _groups(cp, tp):
    return types.SimpleNamespace(cp_size=cp, cp_rank=0, tp_size=tp, pp_size=1, vpp_size=None)


@pytest.mark.parametrize("cp, tp, sp", LAYOUTS)
def test_config_actor_and_layout_pad_alike(cp, tp, sp):
    from megatron_fipo.mcore.context_parallel import CPMicroBatch
    from megatron_fipo.mcore.micro_batches import plan
    from megatron_fipo.parallel.cp_layout import build_cp_layout

    align = cp_alignment(cp, tp, sp)
    assert align == (1 if cp == 1 else 2 * cp * (tp if sp else 1))
    lengths = [5, 1, 9, 2 * align + 1]
    prompts, responses = [[1] * 1 for _ in lengths], [[2] * (n - 1) for n in lengths]
    padded = [-(-n // align) * align for n in lengths]
    # the actor: a budget of exactly the padded total fits in one micro-batch, one token less does not
    mbs = plan(prompts, responses, torch.zeros(len(lengths)), groups=_groups(cp, tp), max_tokens=sum(padded),
               sequence_parallel=sp)
    assert len(mbs) == 1
    if cp > 1:
        assert isinstance(mbs[0].view, CPMicroBatch)
        assert mbs[0].view.layout.padded_lengths.tolist() == padded
        if not sp:
            assert build_cp_layout(lengths, cp, 0).padded_lengths.tolist() == padded
    assert len(plan(prompts, responses, torch.zeros(len(lengths)), groups=_groups(cp, tp),
                    max_tokens=sum(padded) - 1, sequence_parallel=sp)) == 2
    # config validation: the budget must hold one padded longest sequence
    longest = 16 + 15
    need = -(-longest // align) * align
    over = [f"parallel.cp={cp}", f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
            "rollout.max_prompt_length=16", "rollout.max_response_length=15"]
    assert "max_tokens_per_micro_batch" not in _errors(over + [f"optim.max_tokens_per_micro_batch={need}"], cp * tp)
    if need > longest:
        assert f"padded to a multiple of {align}" in _errors(over + [f"optim.max_tokens_per_micro_batch={need - 1}"],
                                                             cp * tp)


def _errors(overrides, world) -> str:
    """The config validation's messages (other sections' errors do not matter here)."""
    from megatron_fipo.config.schema import load_config, validate

    try:
        validate(load_config(None, overrides), world_size=world)
    except ValueError as err:
        return str(err)
    return ""
