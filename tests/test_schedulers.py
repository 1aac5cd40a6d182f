"""Built-in schedulers: values at start, middle and end; always within [0, final]."""

from __future__ import annotations

import pytest

from sparsity_core import create_scheduler


def test_constant_is_the_final_level_from_start_on():
    s = create_scheduler("constant", {"start": 2})
    assert [s(t, 0.8) for t in (0, 1.99, 2, 10)] == [0.0, 0.0, 0.8, 0.8]


def test_linear_rises_from_start_to_end():
    s = create_scheduler("linear", {"start": 2, "end": 6})
    assert s(0, 0.8) == 0.0 and s(2, 0.8) == 0.0
    assert s(4, 0.8) == pytest.approx(0.4)
    assert s(6, 0.8) == pytest.approx(0.8) and s(100, 0.8) == pytest.approx(0.8)


def test_cubic_follows_zhu_and_gupta():
    s = create_scheduler("cubic", {"start": 0, "end": 10})
    assert s(0, 0.9) == 0.0
    assert s(5, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert s(10, 0.9) == pytest.approx(0.9) and s(20, 0.9) == pytest.approx(0.9)


def test_step_multiplies_every_step_size_and_never_exceeds_final():
    s = create_scheduler("step", {"start": 1, "end": 20, "initial_level": 0.1, "gamma": 2.0, "step_size": 2})
    assert s(0, 0.5) == 0.0
    assert s(1, 0.5) == pytest.approx(0.1) and s(2.9, 0.5) == pytest.approx(0.1)
    assert s(3, 0.5) == pytest.approx(0.2) and s(5, 0.5) == pytest.approx(0.4)
    assert s(7, 0.5) == 0.5 and s(10_000, 0.5) == 0.5  # the seed grew without bound; we stop at final
    slow = create_scheduler("step", {"start": 0, "end": 4, "initial_level": 0.01, "gamma": 1.5})
    assert slow(3.9, 0.9) < 0.9 and slow(4, 0.9) == 0.9  # from `end` on: the final level


def test_a_start_equal_to_end_jumps_to_final():
    for name in ("linear", "cubic"):
        s = create_scheduler(name, {"start": 3})
        assert s(2, 0.7) == 0.0 and s(3, 0.7) == pytest.approx(0.7)


@pytest.mark.parametrize("name", ["constant", "linear", "cubic", "step"])
@pytest.mark.parametrize("final", [0.0, 0.3, 1.0])
def test_levels_stay_in_range_and_never_decrease(name, final):
    s = create_scheduler(name, {"start": 1, "end": 9})
    levels = [s(t / 4, final) for t in range(0, 60)]
    assert all(0.0 <= v <= final for v in levels)
    assert levels == sorted(levels)


def test_levels_are_a_pure_function_of_progress():
    a, b = create_scheduler("cubic", {"end": 5}), create_scheduler("cubic", {"end": 5})
    assert [a(t, 0.9) for t in range(7)] == [b(t, 0.9) for t in reversed(range(7))][::-1]


@pytest.mark.parametrize(
    ("initial", "gamma", "step_size"),
    [(0.1, 2.0, 1), (0.1, 1.5, 2), (0.05, 3.0, 1), (0.3, 1.1, 0.5), (0.9, 0.5, 1), (0.125, 2.0, 1)],
)
def test_step_is_exactly_initial_times_gamma_to_the_k(initial, gamma, step_size):
    # exp(log(initial) + k * log(gamma)) is off by ulps: 0.1 came back as 0.10000000000000002,
    # and a level a hair above 0.5 prunes one more block than 0.5 does.
    s = create_scheduler("step", {"start": 1, "end": 1000, "initial_level": initial, "gamma": gamma, "step_size": step_size})
    for k in range(40):
        expected = initial * gamma**k
        if expected > 1.0:
            break
        assert s(1 + k * step_size, 1.0) == expected, k
        assert s(1 + (k + 0.5) * step_size, 1.0) == expected, k  # constant between steps
    half = create_scheduler("step", {"start": 0, "end": 10, "initial_level": 0.1, "gamma": 5.0})
    assert half(1, 0.9) == 0.5


@pytest.mark.parametrize(("initial", "gamma"), [(0.1, 2.0), (1e-300, 10.0), (5e-324, 1e300), (0.5, 0.5), (0.1, 1e300)])
def test_step_has_no_overflow_in_long_runs(initial, gamma):
    s = create_scheduler("step", {"start": 0, "end": 1e12, "initial_level": initial, "gamma": gamma})
    for t in (10, 1_100, 1e6, 1e11):
        level = s(t, 0.8)
        assert 0.0 <= level <= 0.8
        if gamma > 1:
            assert level == 0.8 or t == 10
        else:
            assert level == initial * gamma ** int(t)  # underflows to 0.0, never raises
    denormal = create_scheduler("step", {"start": 0, "end": 100, "initial_level": 1e-310, "gamma": 1e10})
    assert denormal(31, 0.8) == 0.8  # 1e10 ** 31 overflows a float; the level is about 1
