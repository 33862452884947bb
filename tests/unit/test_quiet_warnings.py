"""Third-party notices filtered at their source (megatron_fipo.quiet_warnings), ours still shown."""
import re
import warnings

import pytest

from megatron_fipo import quiet_warnings
from tests.helpers import ACTOR_HF, ACTOR_LOSS, ACTOR_SETTINGS, actor_per_sample, actor_prepare, actor_samples
from tests.hf_tiny import tiny_hf_model


def _generate(path):
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

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


# ----------------------------------------------------------------- megatron-core start-up, torch checkpoint load
def start_step_save_load(root, with_filters):
    """A launch worker (a fresh process, so megatron-core's import-time notices fire again): what a
    training start does (``init_distributed``, a trainable actor, one FIPO step), a checkpoint save
    and a resume's load, recording every warning; with ``install()`` a no-op unless ``with_filters``."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if not with_filters:
            quiet_warnings.install = lambda: None
        from megatron_fipo.mcore import groups as G
        from megatron_fipo.mcore.actor import Actor, ActorSettings
        from megatron_fipo.mcore.model import Qwen2Arch

        groups = G.init_distributed(seed=11)
        actor = Actor(Qwen2Arch.from_hf(ACTOR_HF), groups, ActorSettings(**ACTOR_SETTINGS))
        prompts, responses = actor_samples(n=4)
        per_sample = actor_per_sample(responses, actor.compute_logprobs(prompts, responses))
        actor.train_step(actor_prepare(actor, prompts, responses, per_sample, list(range(len(prompts)))), ACTOR_LOSS)
        actor.load(actor.save(root))
        G.destroy()
        warnings.warn("a genuine warning of ours", UserWarning)
    return [(w.category.__name__, str(w.message), w.filename) for w in seen]


def _module_of(filename):
    """The dotted module of a site-packages file (what a warning raised there is attributed to)."""
    rel = re.split(r"[/\\]site-packages[/\\]", filename)[-1].removesuffix(".py").replace("\\", "/")
    return rel.replace("/", ".").removesuffix(".__init__")


def _matching(seen, entry):
    category, message, module, _why = entry
    return [(c, m, f) for c, m, f in seen
            if c == category.__name__ and re.match(message, m, re.I) and re.match(module, _module_of(f))]


LIBRARY_FILTERS = [f for f in quiet_warnings.FILTERS if not f[2].startswith(r"torch\.nn")]  # not the generation's


@pytest.fixture(scope="module")
def start_warnings(tmp_path_factory):
    """(with the filters, without them): the warnings of ``start_step_save_load`` in two fresh processes."""
    from tests.dist.launcher import launch

    root = tmp_path_factory.mktemp("quiet")
    return tuple(launch(start_step_save_load, 1, str(root / f"ckpt{on}"), on, timeout=150)[0] for on in (True, False))


@pytest.mark.timeout(200)
def test_training_start_and_checkpoint_load_record_no_library_notice(start_warnings):
    quiet, _ = start_warnings
    for entry in LIBRARY_FILTERS:
        assert not [m for c, m, f in quiet if re.match(entry[1], m, re.I)], (entry[3], quiet)
    assert ("UserWarning", "a genuine warning of ours") in [q[:2] for q in quiet]


@pytest.mark.timeout(200)
def test_without_the_filters_start_and_load_do_warn(start_warnings):
    """The before: each library filter matches a warning the same calls record with install() a no-op
    (its category, message and the module it is attributed to), so the test above can fail."""
    _, loud = start_warnings
    for entry in LIBRARY_FILTERS:
        assert _matching(loud, entry), (entry[3], loud)


@pytest.mark.timeout(200)
def test_ours_and_the_same_text_from_another_module_still_show(start_warnings):
    """With the filters installed: the recorded notices attributed to their own module are dropped,
    the same texts attributed to a module of ours show, and so does a warning of ours."""
    _, loud = start_warnings
    notices = {(c, m) for entry in LIBRARY_FILTERS for c, m, f in _matching(loud, entry)}
    sources = {(c, m): _module_of(f) for entry in LIBRARY_FILTERS for c, m, f in _matching(loud, entry)}
    category = {f[0].__name__: f[0] for f in LIBRARY_FILTERS}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_warnings.install()
        for c, m in sorted(notices):
            warnings.warn_explicit(m, category[c], "source.py", 1, module=sources[(c, m)])
            warnings.warn_explicit(m, category[c], "elsewhere.py", 1, module="megatron_fipo.elsewhere")
        warnings.warn("a genuine warning of ours", UserWarning)
    shown = [(w.category.__name__, str(w.message), w.filename) for w in seen]
    assert sorted((c, m) for c, m, f in shown if f == "elsewhere.py") == sorted(notices)
    assert not [s for s in shown if s[2] == "source.py"], shown
    assert ("UserWarning", "a genuine warning of ours") in [s[:2] for s in shown]
