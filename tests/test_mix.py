"""The pure dual-model mix (rdt_lib.mix): step index from sigma, the mix, the dual denoiser."""

import pytest
import torch

from rdt_lib.mix import DualDenoiser, cfg_combine, guided, mix, num_steps_of, step_index
from rdt_lib.schedules import parse_schedule

SIGMAS = [14.6, 7.0, 3.1, 1.2, 0.4, 0.0]  # 5 steps, ending in 0


def test_step_index_first_evaluations():
    for i, s in enumerate(SIGMAS[:-1]):
        assert step_index(SIGMAS, s) == i
        assert step_index(torch.tensor(SIGMAS), torch.full((3,), s)) == i


def test_step_index_tolerates_float32_rounding():
    sig32 = torch.tensor(SIGMAS, dtype=torch.float32)
    for i in range(5):
        assert step_index(SIGMAS, sig32[i]) == i


def test_step_index_heun_second_evaluation_gets_next_step():
    # Heun evaluates step i at sigmas[i] and again at sigmas[i+1] (skipped when that is 0)
    calls = []
    for i in range(5):
        calls.append(SIGMAS[i])
        if SIGMAS[i + 1] != 0:
            calls.append(SIGMAS[i + 1])
    assert [step_index(SIGMAS, s) for s in calls] == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_step_index_midpoints_and_out_of_range():
    # DPM-2 evaluates at the geometric midpoint of a step: still that step
    for i in range(4):
        mid = (SIGMAS[i] * SIGMAS[i + 1]) ** 0.5
        assert step_index(SIGMAS, mid) == i
    assert step_index(SIGMAS, 0.2) == 4  # between the last sigma and 0
    assert step_index(SIGMAS, 15.0) == 0  # raised by s_churn above sigmas[0]
    assert step_index(SIGMAS, 0.0) == 4  # the final 0 maps to the last step


def test_step_index_repeated_sigmas_take_the_first():
    sig = [10.0, 5.0, 5.0, 2.0, 0.0]
    assert [step_index(sig, s) for s in (10.0, 5.0, 2.0)] == [0, 1, 3]


def test_step_index_truncated_list_counts_steps_run():
    # denoise < 1: the sampler gets only the last steps; the index counts those steps
    full = [14.6, 9.0, 7.0, 3.1, 1.2, 0.4, 0.0]
    tail = full[3:]
    assert num_steps_of(tail) == 3
    assert [step_index(tail, s) for s in tail[:-1]] == [0, 1, 2]


def test_num_steps_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        num_steps_of([1.0])


def test_mix_and_cfg_formulas():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(mix(a, b, 0.0), a) and torch.equal(mix(a, b, 1.0), b)
    assert torch.allclose(mix(a, b, 0.25), torch.tensor([1.5, 1.0]))
    assert torch.allclose(cfg_combine(b, a, 3.0), torch.tensor([7.0, -10.0]))


def _toy(scale):
    def d(x, sigma):
        s = sigma if torch.is_tensor(sigma) else torch.tensor(sigma)
        return x * scale / (1.0 + s.reshape(-1, *[1] * (x.ndim - 1)) ** 2)
    return d


def test_guided_two_pass_cfg():
    cond, uncond = _toy(2.0), _toy(0.5)
    x, s = torch.randn(2, 3), torch.full((2,), 1.5)
    expected = uncond(x, s) + 4.0 * (cond(x, s) - uncond(x, s))
    assert torch.allclose(guided(cond, uncond, 4.0)(x, s), expected)
    assert guided(cond, None, 1.0) is cond
    with pytest.raises(ValueError, match="unconditional"):
        guided(cond, None, 2.0)


@pytest.mark.parametrize("spec", ["linear", "power:2", "switch:2", "switch@0.6", "cosine", "tuned", "base"])
def test_dual_denoiser_matches_hand_mix(spec):
    base, tuned = _toy(1.0), _toy(-3.0)
    x = torch.randn(2, 4)
    sched = parse_schedule(spec)
    dual = DualDenoiser(base, tuned, spec, sigmas=SIGMAS)
    for i, s in enumerate(SIGMAS[:-1]):
        sig = torch.full((2,), s)
        w = sched.weight(i, 5)
        hand = (1 - w) * base(x, sig) + w * tuned(x, sig)
        assert (base(x, sig) - tuned(x, sig)).abs().max() > 1e-2  # the two models differ
        assert torch.allclose(dual(x, sig), hand, atol=1e-6)


def test_dual_denoiser_skips_zero_weight_models_and_uses_joint():
    counts = {"b": 0, "t": 0, "j": 0}
    base, tuned = _toy(1.0), _toy(2.0)

    def b(x, s):
        counts["b"] += 1
        return base(x, s)

    def t(x, s):
        counts["t"] += 1
        return tuned(x, s)

    def j(x, s):
        counts["j"] += 1
        return base(x, s), tuned(x, s)

    x = torch.randn(1, 3)
    two = DualDenoiser(b, t, "power:2", sigmas=SIGMAS)
    one = DualDenoiser(b, t, "power:2", sigmas=SIGMAS, joint=j)
    for s in SIGMAS[:-1]:
        assert torch.allclose(two(x, torch.tensor([s])), one(x, torch.tensor([s])), atol=1e-6)
    # step 0 has w = 0: base only, both times; steps 1..4 need both
    assert counts == {"b": 1 + 4 + 1, "t": 4, "j": 4}
    assert one.evaluations == {"base": 1, "tuned": 0, "joint": 4}
    counts.update(b=0, t=0, j=0)
    sw = DualDenoiser(b, t, "switch:3", sigmas=SIGMAS, joint=j)
    for s in SIGMAS[:-1]:
        sw(x, torch.tensor([s]))
    assert counts == {"b": 3, "t": 2, "j": 0}


def test_dual_denoiser_sigmas_per_call_and_errors():
    dual = DualDenoiser(_toy(1.0), _toy(2.0), "switch:1")
    x = torch.randn(1, 2)
    assert torch.allclose(dual(x, torch.tensor([7.0]), sigmas=SIGMAS), _toy(2.0)(x, torch.tensor([7.0])))
    with pytest.raises(ValueError, match="sigma list"):
        dual(x, torch.tensor([7.0]))
    with pytest.raises(ValueError, match="needs a tuned model"):
        DualDenoiser(_toy(1.0), None, "linear")
    DualDenoiser(_toy(1.0), None, "base", sigmas=SIGMAS)(x, torch.tensor([7.0]))


def test_heun_with_dual_denoiser_uses_per_step_weights():
    """A Heun loop over the dual denoiser: each evaluation's weight follows the sigma, not a call count."""
    seen = []

    def base(x, s):
        seen.append(("b", float(s[0])))
        return torch.zeros_like(x)

    def tuned(x, s):
        seen.append(("t", float(s[0])))
        return torch.zeros_like(x)

    dual = DualDenoiser(base, tuned, "switch:2", sigmas=SIGMAS)
    x = torch.ones(1, 1)
    for i in range(5):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        d = (x - dual(x, torch.tensor([s]))) / s
        x2 = x + d * (s_next - s)
        if s_next != 0:
            d2 = (x2 - dual(x2, torch.tensor([s_next]))) / s_next
            x = x + (d + d2) / 2 * (s_next - s)
        else:
            x = x2
    models = [m for m, _ in seen]
    # evaluations at sigmas 14.6, 7.0 | 7.0, 3.1 | 3.1, 1.2 | 1.2, 0.4 | 0.4 -> steps 0,1,1,2,2,3,3,4,4
    assert models == ["b", "b", "b", "t", "t", "t", "t", "t", "t"]
