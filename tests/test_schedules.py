"""Schedule semantics against SPEC.md section 1's formulas, round trips, and every bad-spec error."""

import math

import pytest

from rdt_lib.schedules import (
    BaseOnly,
    Cosine,
    Keyframes,
    Linear,
    Power,
    SwitchAtFraction,
    SwitchAtStep,
    TunedOnly,
    parse_schedule,
)

N_VALUES = [1, 4, 25, 40]


@pytest.mark.parametrize("n", N_VALUES)
def test_weights_follow_the_formulas(n):
    for i in range(n):
        assert parse_schedule("base").weight(i, n) == 0.0
        assert parse_schedule("tuned").weight(i, n) == 1.0
        assert parse_schedule("switch:30").weight(i, n) == (1.0 if i >= 30 else 0.0)
        assert parse_schedule("switch@0.6").weight(i, n) == (1.0 if i / n >= 0.6 else 0.0)
        assert parse_schedule("linear").weight(i, n) == pytest.approx(i / n, abs=0)
        assert parse_schedule("power:2").weight(i, n) == pytest.approx((i / n) ** 2, rel=1e-15)
        assert parse_schedule("power:1.25").weight(i, n) == pytest.approx((i / n) ** 1.25, rel=1e-15)
        assert parse_schedule("cosine").weight(i, n) == pytest.approx((1 - math.cos(math.pi * i / n)) / 2, rel=1e-15)


def test_hand_worked_cases():
    # ImageReFL combined generation: 40 DDPM steps, switch at 30 -> steps 30..39 tuned (10 steps)
    assert sum(parse_schedule("switch:30").weights(40)) == 10
    # switch:0 is tuned at every step: no base step (the ImageReFL k = 0 bug is not reproduced)
    assert parse_schedule("switch:0").weights(40) == [1.0] * 40
    # power:P never reaches 1: the last step is ((N-1)/N)^P
    assert parse_schedule("power:4").weight(24, 25) == pytest.approx((24 / 25) ** 4)
    assert parse_schedule("power:4").weight(24, 25) < 1
    # switch@0.75 of 20 steps: 15..19 tuned
    assert parse_schedule("switch@0.75").weights(20) == [0.0] * 15 + [1.0] * 5
    # the weight depends on the step index, not on the timestep: same value for any scheduler
    assert parse_schedule("linear").weights(4) == [0.0, 0.25, 0.5, 0.75]


def test_keyframes_are_piecewise_linear_in_progress():
    s = parse_schedule("keyframes:0.2=0,0.6=1")
    n = 10
    expected = []
    for i in range(n):
        x = i / n
        expected.append(0.0 if x <= 0.2 else 1.0 if x >= 0.6 else (x - 0.2) / 0.4)
    assert s.weights(n) == pytest.approx(expected, abs=1e-12)
    three = parse_schedule("keyframes:0=0.5,0.5=0,1=1")
    assert three.weight(0, 4) == 0.5
    assert three.weight(1, 4) == pytest.approx(0.25)  # halfway from 0.5 down to 0
    assert three.weight(3, 4) == pytest.approx(0.5)  # halfway from 0 up to 1


@pytest.mark.parametrize(
    "spec",
    ["base", "tuned", "switch:0", "switch:30", "switch@0", "switch@0.75", "switch@1", "linear", "power:2",
     "power:0.5", "power:1.25", "cosine", "keyframes:0=0,0.5=0.25,1=1", "keyframes:0.3=1"],
)
def test_round_trip(spec):
    s = parse_schedule(spec)
    again = parse_schedule(str(s))
    assert again == s
    assert str(again) == str(s)
    assert again.weights(17) == s.weights(17)


def test_objects_and_specs_agree():
    assert parse_schedule("switch:5") == SwitchAtStep(5)
    assert parse_schedule("switch@0.5") == SwitchAtFraction(0.5)
    assert parse_schedule("power:3") == Power(3.0)
    assert parse_schedule("linear") == Linear()
    assert parse_schedule("cosine") == Cosine()
    assert parse_schedule("base") == BaseOnly() and parse_schedule("tuned") == TunedOnly()
    assert parse_schedule("keyframes:0=0,1=1") == Keyframes(((0.0, 0.0), (1.0, 1.0)))
    assert parse_schedule(" Power:2 ") == Power(2.0)  # case and whitespace tolerant
    s = Power(2.0)
    assert parse_schedule(s) is s


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("power:0", "P must be > 0"),
        ("power:-1", "P must be > 0"),
        ("power:x", "'x' is not a number"),
        ("power:nan", "not finite"),
        ("switch:-1", "K must be >= 0"),
        ("switch:2.5", "integer step index"),
        ("switch@1.5", "F must be in [0, 1]"),
        ("switch@-0.1", "F must be in [0, 1]"),
        ("keyframes:0=0,0.5=1.5", "outside [0, 1]"),
        ("keyframes:0=-0.1", "outside [0, 1]"),
        ("keyframes:1.2=0", "outside [0, 1]"),
        ("keyframes:0.5=0,0.2=1", "strictly increasing"),
        ("keyframes:0.5=0,0.5=1", "strictly increasing"),
        ("keyframes:0.5", "P=W"),
        ("sigmoid", "unknown schedule 'sigmoid'"),
        ("", "unknown schedule"),
    ],
)
def test_bad_specs_name_the_problem_and_list_the_forms(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_schedule(spec)
    msg = str(err.value)
    assert fragment in msg
    assert "accepted:" in msg and "switch@F" in msg and "keyframes" in msg


def test_bad_step_arguments():
    with pytest.raises(ValueError, match="step index"):
        parse_schedule("linear").weight(5, 5)
    with pytest.raises(ValueError, match="num_steps"):
        parse_schedule("linear").weight(0, 0)
    with pytest.raises(ValueError):
        SwitchAtStep(-2)
