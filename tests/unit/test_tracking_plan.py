"""tracking.MetricsLogger (jsonl, TensorBoard, resume truncation) and plan (layout, memory estimate)."""
import json
import os

import pytest

from megatron_fipo.config.schema import load_config
from megatron_fipo.plan import estimate_memory, parameter_counts, plan, rank_layout
from megatron_fipo.train.tracking import MetricsLogger, read_metrics


def test_jsonl_records_and_tensorboard(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=True)
    log.log(1, {"train/reward_mean": 0.5, "eval/pass@4": float("nan")})
    log.log(2, {"train/reward_mean": 0.75})
    log.close()
    recs = read_metrics(str(tmp_path))
    assert recs == [{"step": 1, "train/reward_mean": 0.5, "eval/pass@4": None}, {"step": 2, "train/reward_mean": 0.75}]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"x": s})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "x"')  # torn line of a crash
    log = MetricsLogger(str(tmp_path), resume_step=3, tensorboard=False)
    log.log(4, {"x": 40})
    log.close()
    assert [(r["step"], r["x"]) for r in read_metrics(str(tmp_path))] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    MetricsLogger(str(tmp_path), tensorboard=False).close()  # a fresh run keeps the old file aside
    assert os.path.exists(tmp_path / "metrics.jsonl.old") and not os.path.exists(tmp_path / "metrics.jsonl")


def test_wandb_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="wandb is not installed"):
        MetricsLogger(str(tmp_path), tensorboard=False, wandb_project="p")


@pytest.mark.parametrize("world, tp, pp, cp", [(16, 2, 2, 1), (8, 8, 1, 1), (24, 2, 3, 2), (1, 1, 1, 1)])
def test_rank_layout_matches_megatron_order(world, tp, pp, cp):
    layout = rank_layout(world, tp, pp, cp)
    dp = world // (tp * pp * cp)
    assert len({(r["tp"], r["cp"], r["dp"], r["pp"]) for r in layout}) == world
    for r in layout:  # Megatron's default order tp-cp-dp-pp (tp fastest)
        assert r["rank"] == r["tp"] + tp * (r["cp"] + cp * (r["dp"] + dp * r["pp"]))


QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064,
                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


def test_parameter_count_of_qwen25_7b():
    # Qwen2.5-7B has 7.62 B parameters
    assert parameter_counts(QWEN25_7B)["total"] == pytest.approx(7.62e9, rel=0.01)


def test_tiny_model_count_equals_hf():
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=96, vocab_size=201, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_memory_estimate_shrinks_with_parallelism():
    base = ["model.params_dtype=bfloat16", "optim.max_tokens_per_micro_batch=24576"]
    one = estimate_memory(load_config(None, base + ["parallel.tp=1"]), QWEN25_7B, 8)
    four = estimate_memory(load_config(None, base + ["parallel.tp=4"]), QWEN25_7B, 8)
    assert four["weights"] == pytest.approx(one["weights"] / 4, rel=0.05)
    assert four["total"] < one["total"]


def test_plan_reports_and_rejects_impossible_layouts():
    cfg = load_config(None, ["parallel.tp=4", "parallel.pp=2", "model.params_dtype=bfloat16"])
    report = plan(cfg, 16, QWEN25_7B)
    assert (report["dp"], report["nodes"]) == (2, 2) and len(report["first_node"]) == 8
    json.dumps(report)
    with pytest.raises(ValueError, match="not a multiple"):
        plan(cfg, 12, QWEN25_7B)
    with pytest.raises(ValueError, match="attention heads"):
        plan(load_config(None, ["parallel.tp=8"]), 8, QWEN25_7B)


def test_plan_reports_context_parallelism():
    from megatron_fipo.plan import format_plan

    base = ["parallel.tp=4", "model.params_dtype=bfloat16", "optim.max_tokens_per_micro_batch=24576"]
    assert plan(load_config(None, base), 8, QWEN25_7B)["context_parallel"] == {}
    cp = plan(load_config(None, base + ["parallel.cp=2", "parallel.sequence_parallel=true"]), 8, QWEN25_7B)
    assert cp["context_parallel"] == {"pad_to": 16, "tokens_per_gpu": 12288, "micro_batch_tokens": 24576,
                                      "scan_bytes_per_sequence": 8}
    assert "context parallel: sequences padded to multiples of 16; <= 12288 tokens per GPU" in format_plan(cp)
    no_cp = plan(load_config(None, base), 4, QWEN25_7B)["memory_gib"]
    assert cp["memory_gib"]["activations"] == pytest.approx(no_cp["activations"] / 2, rel=0.01)
    with pytest.raises(ValueError, match="padded to a multiple of 16"):  # the budget must hold a padded sequence
        plan(load_config(None, base + ["parallel.cp=2", "parallel.sequence_parallel=true",
                                       "rollout.max_prompt_length=7", "rollout.max_response_length=8",
                                       "optim.max_tokens_per_micro_batch=15", "algo.overlong_buffer=0"]), 8, QWEN25_7B)


def test_plot_run_draws_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                           "tools", "plot_run.py"))
    plot_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_run)
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"train/acc_mean": s / 10, **({"eval/avg@4": s / 5} if s % 2 else {})})
    log.close()
    paths = plot_run.plot(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["train_acc_mean.png", "eval_avg_at_4.png", "overview.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)
    with pytest.raises(SystemExit, match="none of the keys"):
        plot_run.plot(str(tmp_path), keys=["nope"])
