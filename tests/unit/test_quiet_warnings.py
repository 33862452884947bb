"""Third-party notices filtered at their source (megatron_fipo.quiet_warnings), ours still shown."""
import warnings

from megatron_fipo import quiet_warnings
from megatron_fipo.rollout.cpu_engine import CPUEngine
from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
from tests.hf_tiny import tiny_hf_model


def _generate(path):
    req = GenerationRequest((1, 2, 3), SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=0))
    return CPUEngine(path, max_batch_rows=2).generate([req])


def test_generation_emits_no_transformers_notice_and_ours_still_shows(tmp_path):
    path = tiny_hf_model(str(tmp_path / "m"), seed=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = _generate(path)
        warnings.warn("a genuine warning of ours", UserWarning)
        # the same text attributed elsewhere is not filtered: the filters are precise
        warnings.warn_explicit("`past_key_values` is deprecated and will be removed in version 9", FutureWarning,
                               "elsewhere.py", 1, module="megatron_fipo.elsewhere")
    assert len(out[0]) == 2
    texts = [(w.category, str(w.message), w.filename) for w in seen]
    from_torch = [t for t in texts if "past_key_values" in t[1] and "torch" in t[2]]
    assert not from_torch, texts
    assert (UserWarning, "a genuine warning of ours") in [t[:2] for t in texts]
    assert any(t[2] == "elsewhere.py" for t in texts)


def test_without_the_filters_generation_does_warn(tmp_path, monkeypatch):
    """The before: the same generation with install() a no-op records the notice (so the test above can fail)."""
    path = tiny_hf_model(str(tmp_path / "m"), seed=3)
    monkeypatch.setattr(quiet_warnings, "install", lambda: None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _generate(path)
    assert any(issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message) for w in seen)
