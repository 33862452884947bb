"""Avg@k / Cons@k / Pass@k against naive references (subset enumeration, exact binomials, loops)."""

import itertools
import math
import random
from fractions import Fraction

import pytest

from megatron_fipo.algo.metrics import avg_at_k, cons_at_k, eval_metrics, majority_index, pass_at_k

SEEDS = [11, 23, 37, 41, 59]
ANSWERS = ["5", "7", "\\frac{1}{2}", "12", "[INVALID]", "[TIMEOUT]", ""]


def naive_pass_subsets(accs: list[bool], k: int) -> Fraction:
    """Fraction of all k-subsets of the samples that contain a correct one."""
    hits = total = 0
    for subset in itertools.combinations(range(len(accs)), k):
        total += 1
        hits += any(accs[i] for i in subset)
    return Fraction(hits, total)


def naive_pass_comb(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def naive_avg(accs) -> float:
    correct = 0
    for acc in accs:
        if acc:
            correct += 1
    return correct / len(accs)


def naive_cons(preds: list[str], accs: list[bool]) -> float:
    """Plain loops: count each valid answer, keep the first strictly larger count in sample order."""
    best_pred, best_count = None, 0
    for i, pred in enumerate(preds):
        if pred in ("[INVALID]", "[TIMEOUT]", "[ERROR]", ""):
            continue
        count = 0
        for other in preds:
            if other == pred:
                count += 1
        if count > best_count:
            best_pred, best_count = pred, count
    if best_pred is None:
        return 0.0
    return 1.0 if accs[preds.index(best_pred)] else 0.0


def random_problem(rng: random.Random, n: int, gold: str = "5") -> list[tuple[str, bool]]:
    preds = [rng.choice(ANSWERS) for _ in range(n)]
    return [(pred, pred == gold) for pred in preds]


@pytest.mark.parametrize("seed", SEEDS)
def test_pass_at_k_matches_subset_enumeration(seed):
    rng = random.Random(seed)
    for n in range(1, 11):
        accs = [rng.random() < rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(accs), k) == pytest.approx(float(naive_pass_subsets(accs, k)), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pass_at_k_matches_binomials_up_to_1024(seed):
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.choice([1, 2, 16, 32, 100, 513, 1024])
        c, k = rng.randint(0, n), rng.randint(1, n)
        expected = float(naive_pass_comb(n, c, k))
        got = pass_at_k(n, c, k)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_edge_cases():
    for n in (1, 2, 32, 1024):
        assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, 0, n) == 0.0  # c = 0
        assert pass_at_k(n, n, 1) == 1.0 and pass_at_k(n, n, n) == 1.0  # c = n
        assert pass_at_k(n, 1, n) == 1.0  # k = n: any correct sample is drawn
        assert pass_at_k(n, 1, 1) == pytest.approx(1.0 / n, rel=1e-14)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0  # n = 1
    assert pass_at_k(1024, 1, 1) > 0.0  # tiny probabilities are not lost to cancellation


@pytest.mark.parametrize("args", [(4, 2, 5), (4, 2, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4.0, 2, 1), (4, 2, 1.5), (4, 2, True)])
def test_pass_at_k_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


@pytest.mark.parametrize("seed", SEEDS)
def test_avg_and_cons_match_naive(seed):
    rng = random.Random(seed)
    for _ in range(300):
        problem = random_problem(rng, rng.randint(1, 12), gold=rng.choice(ANSWERS[:4]))
        if rng.random() < 0.3:  # inconsistent acc for a pred: the first sample of the winner decides
            problem = [(pred, rng.random() < 0.5) for pred, _ in problem]
        preds, accs = [p for p, _ in problem], [a for _, a in problem]
        assert avg_at_k(accs) == naive_avg(accs)
        assert cons_at_k(preds, accs) == naive_cons(preds, accs)


def test_cons_tie_breaks_to_first_seen_answer():
    assert majority_index(["7", "5", "5", "7"]) == 0
    assert cons_at_k(["7", "5", "5", "7"], [False, True, True, False]) == 0.0
    assert cons_at_k(["5", "7", "7", "5"], [True, False, False, True]) == 1.0
    assert majority_index(["1", "2", "2"]) == 1


def test_cons_invalid_answers_do_not_vote():
    preds = ["[INVALID]", "[INVALID]", "[TIMEOUT]", "", "5"]
    assert majority_index(preds) == 4
    assert cons_at_k(preds, [False] * 4 + [True]) == 1.0
    assert majority_index(["[INVALID]", "[ERROR]"]) is None
    assert cons_at_k(["[INVALID]", "[INVALID]"], [False, False]) == 0.0


def test_cons_and_avg_reject_bad_input():
    with pytest.raises(ValueError):
        cons_at_k(["5"], [True, False])
    with pytest.raises(ValueError):
        cons_at_k([], [])
    with pytest.raises(ValueError):
        avg_at_k([])


@pytest.mark.parametrize("seed", SEEDS)
def test_eval_metrics_matches_naive(seed):
    rng = random.Random(seed)
    for _ in range(20):
        n_max = rng.randint(1, 9)
        problems = [random_problem(rng, rng.randint(n_max, n_max + 3), gold=rng.choice(ANSWERS[:4]))
                    for _ in range(rng.randint(1, 6))]
        k = rng.randint(1, n_max)
        got = eval_metrics(problems, k)
        assert set(got) == {f"avg@{k}", f"cons@{k}", f"pass@{k}"}
        avg = cons = pas = 0.0
        for problem in problems:
            preds, accs = [p for p, _ in problem], [a for _, a in problem]
            avg += naive_avg(accs)
            cons += naive_cons(preds[:k], accs[:k])
            pas += float(naive_pass_subsets(accs, k)) if len(accs) <= 10 else float(naive_pass_comb(len(accs), sum(accs), k))
        assert got[f"avg@{k}"] == pytest.approx(avg / len(problems), abs=1e-12)
        assert got[f"cons@{k}"] == pytest.approx(cons / len(problems), abs=1e-12)
        assert got[f"pass@{k}"] == pytest.approx(pas / len(problems), abs=1e-12)


def test_eval_metrics_aime_shape_and_default_k():
    # 2 problems x 32 samples: one solved by 8 samples (majority "5"), one never solved.
    solved = [("5", True)] * 8 + [("6", False)] * 6 + [("[INVALID]", False)] * 18
    unsolved = [("9", False)] * 32
    got = eval_metrics([solved, unsolved])
    assert got == pytest.approx({"avg@32": 8 / 32 / 2, "cons@32": 0.5, "pass@32": 0.5})
    assert eval_metrics([[("5", True)]]) == {"avg@1": 1.0, "cons@1": 1.0, "pass@1": 1.0}


def test_eval_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        eval_metrics([])
    with pytest.raises(ValueError):
        eval_metrics([[("5", True)], []])
    with pytest.raises(ValueError, match="k must be"):
        eval_metrics([[("5", True)] * 4, [("5", True)] * 2], k=3)
