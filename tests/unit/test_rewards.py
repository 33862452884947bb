"""Math rewards: correctness tables, naive-scan references, hostile inputs and the process pool.

This module is imported by spawned pool workers (to unpickle the test reward functions below),
so it must stay cheap to import: no torch, no tests.helpers.
"""

import multiprocessing
import os
import random
import threading
import time

import pytest

from megatron_fipo.algo.rewards import (
    ERROR,
    INVALID,
    MAX_BOXED_DEPTH,
    TIMEOUT,
    RewardResult,
    boxed_math_reward,
    dapo_math_reward,
    extract_last_answer,
    last_boxed_content,
    normalize_final_answer,
)
from megatron_fipo.algo.reward_pool import RewardPool, score_batch

SEEDS = [3, 17, 29, 101]
PAD = "We are done. " * 30  # > 300 characters of reasoning

# --------------------------------------------------------------------------- reward functions for the pool


def hanging_reward(response, ground_truth):
    if response == "hang":
        time.sleep(600)
    return dapo_math_reward(response, ground_truth)


def marked_hang(response, ground_truth):
    """Hangs after creating ``<ground_truth dir>/<worker pid>``: a worker busy for good, found by the test."""
    open(os.path.join(ground_truth, str(os.getpid())), "w").close()
    time.sleep(600)


def failing_reward(response, ground_truth):
    if response == "boom":
        raise ZeroDivisionError("deliberate")
    if response == "crash":
        os._exit(3)
    if response == "dict":
        return {"score": 1.0, "acc": True, "pred": "dict"}
    return dapo_math_reward(response, ground_truth)


# --------------------------------------------------------------------------- naive references


def naive_last_answer(text):
    """Every position of "answer" (case-insensitive), last first; whitespace, ":", rest of line."""
    lowered = text.lower()
    for i in range(len(text) - 6, -1, -1):
        if lowered[i:i + 6] != "answer":
            continue
        j = i + 6
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == ":":
            j += 1
            while j < len(text) and text[j].isspace():
                j += 1
            line = ""
            while j < len(text) and text[j] != "\n":
                line += text[j]
                j += 1
            if line:
                return line
    return None


def naive_last_boxed(text):
    """Depth after every character from the last "\\boxed{"; the first return to depth 0 closes it."""
    starts = [i for i in range(len(text)) if text.startswith("\\boxed{", i)]
    if not starts:
        return None
    begin = starts[-1] + len("\\boxed{")
    depth = 1
    for pos in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[begin:pos]
    return None


def child_pids():
    """Live or zombie children of this process (the shared multiprocessing resource tracker excluded)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"resource_tracker" not in cmdline:
            found.add(int(entry))
    return found


# --------------------------------------------------------------------------- DAPO reward

DAPO_TABLE = [  # response, ground truth, acc, pred
    ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\dfrac{1}{2}", "$\\frac{1}{2}$", True, "\\frac{1}{2}"),
    ("Answer: $$\\tfrac1{2}$$", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\frac{1}{3}", "\\frac{1}{2}", False, "\\frac{1}{3}"),
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1,000", "1,000", True, "1000"),
    ("Answer: 1{,}000", "1000", True, "1000"),
    ("Answer: 1,2", "12", False, "1,2"),
    ("Answer: 5.", "5", True, "5"),
    ("Answer: 2.0", "2", True, "2"),
    ("Answer: 2.50", "2.5", True, "2.5"),
    ("Answer: 6", "5", False, "6"),
    ("answer :   42", "42", True, "42"),
    ("ANSWER:\n42", "42", True, "42"),
    ("Answer: x = 7", "7", True, "7"),
    ("Answer: \\boxed{34}", "34", True, "34"),
    ("Answer: 90^\\circ", "90", True, "90"),
    ("Answer: 5 \\text{ cm}", "5", True, "5"),
    ("Answer: 12 square units", "12", True, "12"),
    ("Answer: \\sqrt2", "\\sqrt{2}", True, "\\sqrt{2}"),
    ("Answer: \\left( 1, 2 \\right)", "(1,2)", True, "(1,2)"),
    ("Answer: 50\\%", "50", True, "50"),
    ("The answer is 5", "5", False, INVALID),
    ("Answer:", "5", False, INVALID),
    ("Answer: $$", "", False, ""),  # an empty prediction never matches, even an empty truth
    ("Answer: 3\nLet me re-check.\nAnswer: 5", "5", True, "5"),
    ("Answer: 3\nLet me re-check.\nAnswer: 5", "3", False, "5"),
    ("Answer: 3. Final Answer: 5", "5", True, "5"),
    ("Answer: 5\nAnswer:", "5", True, "5"),
    ("Answer: 5" + " filler" * 60, "5", False, INVALID),  # marker outside the last 300 characters
    (PAD + "Answer: 5", "5", True, "5"),
    ("Answer: 4\n" + PAD + "Answer: 5", "4", False, "5"),
]


@pytest.mark.parametrize("response,truth,acc,pred", DAPO_TABLE)
def test_dapo_math_reward_table(response, truth, acc, pred):
    got = dapo_math_reward(response, truth)
    assert got == RewardResult(1.0 if acc else -1.0, acc, pred)


def test_dapo_ground_truth_types():
    assert dapo_math_reward("Answer: 34", 34).acc
    assert dapo_math_reward("Answer: 2", 2.0).acc
    assert dapo_math_reward(b"\xff\xfe Answer: 5", "5").acc
    with pytest.raises(ValueError, match="response must be a str"):
        dapo_math_reward(None, "5")
    with pytest.raises(ValueError, match="ground_truth must be a str"):
        dapo_math_reward("Answer: 5", ["5"])


@pytest.mark.parametrize("raw,expected", [
    ("\\text{(A)}", "(A)"), ("x=\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"), ("\\$5", "5"), ("10 \\text{ dollars}", "10"),
    ("-1,234.50", "-1234.5"), ("007.000", "007"), ("\\frac{1}2", "\\frac{1}{2}"), ("\\sqrt[3]{2}", "\\sqrt[3]{2}"),
    ("\\rightarrow", "\\rightarrow"), ("", ""), ("...", ""),
])
def test_normalize_final_answer_table(raw, expected):
    assert normalize_final_answer(raw) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_extract_last_answer_matches_naive_scan(seed):
    rng = random.Random(seed)
    tokens = ["Answer", "answer", "ANSWER", ":", " ", "\n", "\t", "5", "x", "=", "\\frac{1}{2}", "Answer:"]
    for _ in range(2000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 25)))
        assert extract_last_answer(text) == naive_last_answer(text), repr(text)


# --------------------------------------------------------------------------- boxed reward

@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{a{b{c}}d} then \\boxed{{x}}", "{x}"),
    ("\\boxed{1} and \\boxed{2", None),  # the last one is unclosed
    ("no box", None),
    ("\\boxed{}", ""),
])
def test_last_boxed_content_table(text, expected):
    assert last_boxed_content(text) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_last_boxed_content_matches_naive_scan(seed):
    rng = random.Random(seed)
    tokens = ["\\boxed{", "{", "}", "}", "x", "1", " ", "\\frac", "\\boxed"]
    for _ in range(2000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 20)))
        assert last_boxed_content(text) == naive_last_boxed(text), repr(text)


def test_last_boxed_content_bounds():
    assert last_boxed_content("\\boxed{" + "x" * 50 + "}", max_chars=50) == "x" * 50
    assert last_boxed_content("\\boxed{" + "x" * 51 + "}", max_chars=50) is None
    nested = "\\boxed{" + "{" * 3 + "}" * 4
    assert last_boxed_content(nested, max_depth=3) == "{{{}}}" and last_boxed_content(nested, max_depth=2) is None


BOXED_TABLE = [  # response, ground truth, acc
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{2}{4}}", "\\frac12", True),
    ("\\boxed{\\sqrt{\\frac{1}{4}}}", "\\frac{1}{2}", True),  # nested braces
    ("first \\boxed{3}, finally \\boxed{4}", "4", True),
    ("first \\boxed{4}, finally \\boxed{3}", "4", False),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{34}", 34, True),
    ("\\boxed{35}", "34", False),
    ("Answer: 34", "34", False),  # no box
    ("\\boxed{34", "34", False),  # unclosed
]


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("response,truth,acc", BOXED_TABLE)
def test_boxed_math_reward_table(response, truth, acc):
    got = boxed_math_reward(response, truth)
    assert got.acc is acc and got.score == (1.0 if acc else -1.0)


@pytest.mark.timeout(60, method="thread")
def test_boxed_math_reward_outside_main_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=boxed_math_reward("\\boxed{\\frac{2}{4}}", "0.5")))
    thread.start()
    thread.join(30)
    assert out["r"] == RewardResult(1.0, True, "\\frac{2}{4}")


# --------------------------------------------------------------------------- hostile inputs

HOSTILE = {
    "1MB_plain": "x" * 1_000_000,
    "1MB_then_answer": "y" * 1_000_000 + "Answer: 5 so \\boxed{5}",
    "nested_frac_answer": "Answer: " + "\\frac{" * 10_000,
    "nested_frac_boxed": "\\boxed{" + "\\frac{1}{" * 10_000 + "2" + "}" * 10_001,
    "deep_braces": "\\boxed{" + "{" * 5_000 + "1" + "}" * 5_001,
    "braces_at_depth_cap": "\\boxed{" + "{" * MAX_BOXED_DEPTH + "1" + "}" * (MAX_BOXED_DEPTH + 1),
    "unbalanced": "}" * 1_000 + "\\boxed{" + "{" * 1_000,
    "many_boxed": "\\boxed{" * 100_000,
    "long_boxed": "\\boxed{" + "1+" * 100_000 + "1}",
    "long_latex_under_cap": "\\boxed{" + "+".join(["x^{2}"] * 150) + "}",
    "nul_bytes": "\x00" * 1_000 + "Answer: \x00 5 \\boxed{\x00}",
    "lone_surrogates": "\udcff\ud800 Answer: \udcff \\boxed{\ud800}",
    "spaces_after_marker": "Answer:" + " " * 100_000,
    "markers_without_colon": "Answer " * 100_000,
    "many_markers": "Answer: 1\n" * 100_000,
    "power_tower": "Answer: 2^{2^{2^{2^{2^{100}}}}} \\boxed{2^{2^{2^{2^{2^{100}}}}}}",
    "huge_factorial": "\\boxed{(10^{10})!}",
}


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("reward", ["dapo", "boxed"])
def test_hostile_inputs_return_a_score_quickly(name, reward):
    fn = dapo_math_reward if reward == "dapo" else (lambda r, g: boxed_math_reward(r, g, timeout_s=1))
    start = time.monotonic()
    got = fn(HOSTILE[name], "5")
    assert time.monotonic() - start < 5.0
    assert isinstance(got, RewardResult) and got.score in (1.0, -1.0) and isinstance(got.pred, str)
    assert got.acc is (name == "1MB_then_answer")


# --------------------------------------------------------------------------- process pool

POOL_RESPONSES = [row[0] for row in DAPO_TABLE] + [row[0] for row in BOXED_TABLE]
POOL_TRUTHS = [row[1] for row in DAPO_TABLE] + [str(row[1]) for row in BOXED_TABLE]


@pytest.mark.timeout(60, method="thread")
def test_pool_matches_in_process_and_is_reusable():
    before = child_pids()
    expected = {name: score_batch(name, POOL_RESPONSES, POOL_TRUTHS, num_workers=0, timeout_s=10)
                for name in ("dapo_math", "boxed_math")}
    with RewardPool(num_workers=2, timeout_s=10) as pool:
        for name in ("dapo_math", "boxed_math", "dapo_math"):
            assert pool.score(name, POOL_RESPONSES, POOL_TRUTHS) == expected[name]
        assert len(child_pids() - before) == 2  # the scan sees the workers
        assert pool.score(dapo_math_reward, [], []) == []
    assert multiprocessing.active_children() == [] and child_pids() <= before
    assert score_batch("dapo_math", POOL_RESPONSES, POOL_TRUTHS, num_workers=1, timeout_s=10) == expected["dapo_math"]
    assert multiprocessing.active_children() == [] and child_pids() <= before


@pytest.mark.timeout(60, method="thread")
def test_pool_times_out_a_hanging_reward_without_wedging():
    before = child_pids()
    responses = ["Answer: 1", "hang", "Answer: 2", "hang", "Answer: 3"]
    start = time.monotonic()
    with RewardPool(num_workers=2, timeout_s=2.5) as pool:
        got = pool.score(hanging_reward, responses, ["1", "1", "2", "2", "4"])
        assert [r.pred for r in got] == ["1", TIMEOUT, "2", TIMEOUT, "3"]
        assert [r.score for r in got] == [1.0, -1.0, 1.0, -1.0, -1.0] and not got[1].acc
        assert len(child_pids() - before) == 2  # hung workers were reaped and replaced, not leaked
        assert [r.pred for r in pool.score(hanging_reward, ["Answer: 7"] * 4, ["7"] * 4)] == ["7"] * 4
    assert time.monotonic() - start < 20.0
    assert multiprocessing.active_children() == [] and child_pids() <= before


@pytest.mark.timeout(60, method="thread")
def test_pool_worker_crash_exception_and_dict_results():
    before = child_pids()
    with RewardPool(num_workers=2, timeout_s=10) as pool:
        got = pool.score(failing_reward, ["Answer: 1", "crash", "dict"], ["1", "1", "1"])
        assert got == [RewardResult(1.0, True, "1"), RewardResult(-1.0, False, ERROR), RewardResult(1.0, True, "dict")]
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            pool.score(failing_reward, ["Answer: 1", "boom", "Answer: 2"], ["1", "1", "2"])
        assert pool.score(failing_reward, ["Answer: 2"] * 3, ["2"] * 3) == [RewardResult(1.0, True, "2")] * 3
    with pytest.raises(RuntimeError, match="closed"):
        pool.score("dapo_math", ["Answer: 1"], ["1"])
    assert multiprocessing.active_children() == [] and child_pids() <= before


_HOLD_POOL = """
import sys
from megatron_fipo.algo.reward_pool import RewardPool
from tests.unit.test_rewards import marked_hang
RewardPool(2, timeout_s=600).score(marked_hang, ["a", "b"], [sys.argv[1]] * 2)
"""


@pytest.mark.timeout(180, method="thread")
def test_busy_workers_and_resource_tracker_die_with_a_sigkilled_parent(tmp_path):
    """A parent killed by SIGKILL (no cleanup runs) while both workers hang in the reward function:
    the workers (and then multiprocessing's resource tracker) exit within seconds instead of
    living on under init."""
    import signal
    import subprocess
    import sys

    import psutil

    from tests.helpers import alive_processes  # here: tests.helpers imports torch (see the module docstring)

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_POOL, str(tmp_path)], cwd=repo, env=env,
                            start_new_session=True)
    kids = []
    try:
        deadline = time.monotonic() + 150
        while len(os.listdir(tmp_path)) < 2:  # both workers are inside the reward function
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.2)
        kids = psutil.Process(proc.pid).children(recursive=True)
        busy = {int(name) for name in os.listdir(tmp_path)}
        assert busy <= {k.pid for k in kids} and len(kids) == 3, kids  # 2 workers + the resource tracker
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while alive_processes(kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive_processes(kids), [(p.pid, p.cmdline()) for p in alive_processes(kids)]
    finally:
        for p in [proc.pid] + [k.pid for k in kids]:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()


def test_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        score_batch("dapo_math", ["a", "b"], ["a"], num_workers=0, timeout_s=1)
    with pytest.raises(ValueError, match="boxed_math.*dapo_math"):
        score_batch("dapo", ["a"], ["a"], num_workers=0, timeout_s=1)
    with pytest.raises(ValueError, match="module-level"):
        score_batch(lambda r, g: dapo_math_reward(r, g), ["a"], ["a"], num_workers=1, timeout_s=1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=-1, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(num_workers=0, timeout_s=0)
    with pytest.raises(ValueError, match=r"responses\[1\]"):
        score_batch("dapo_math", ["a", None], ["a", "b"], num_workers=0, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        boxed_math_reward("\\boxed{1}", "1", timeout_s=0)
    with pytest.raises(ValueError, match="must return RewardResult"):
        score_batch(lambda r, g: 1.0, ["a"], ["a"], num_workers=0, timeout_s=1)
    assert multiprocessing.active_children() == []
