"""Model sampling and sigma lists against diffusers' schedulers and the formulas written out by hand."""

import math

import numpy as np
import pytest
import torch

from rdt_lib import sigma_schedules as ss
from rdt_lib.model_sampling import DiscreteVP, FlowMatch, model_sampling_from_config

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
      "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def vp():
    return model_sampling_from_config(SD)


def _diffusers(cls_name, **over):
    import diffusers

    return getattr(diffusers, cls_name).from_config({**SD, **over})


def test_sigma_table_timestep_and_interpolation(vp):
    ac = _diffusers("DDIMScheduler").alphas_cumprod
    # ComfyUI derives the table in float64, diffusers in float32: 1.3e-5 apart at t = 0, closer elsewhere
    torch.testing.assert_close(vp.sigmas, ((1 - ac) / ac).sqrt(), rtol=2e-5, atol=0)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    assert torch.equal(vp.timestep(vp.sigmas[t.long()]), t)
    # nearest in log-sigma, not in sigma: just above the geometric mean of two neighbours goes up
    lo, hi = vp.sigmas[400], vp.sigmas[401]
    assert float(vp.timestep((lo * hi).sqrt() * 1.0001)) == 401.0
    assert float(vp.timestep((lo * hi).sqrt() * 0.9999)) == 400.0
    torch.testing.assert_close(vp.sigma(torch.tensor(400.5)), (lo * hi).sqrt(), rtol=1e-6, atol=0)
    assert vp.sigma_min == pytest.approx(float(vp.sigmas[0])) and vp.sigma_max == pytest.approx(float(vp.sigmas[-1]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoised_equals_ddim_pred_original_sample(prediction_type):
    """x0 from the network output in sigma space equals diffusers' x0 in the variance-preserving frame."""
    sch = _diffusers("DDIMScheduler", prediction_type=prediction_type)
    sch.set_timesteps(10)
    ms = model_sampling_from_config({**SD, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    x_vp, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in sch.timesteps[[0, 5, 9]]:
        a = sch.alphas_cumprod[t]
        sigma = float(((1 - a) / a) ** 0.5)
        x_ve = x_vp / a.sqrt()
        torch.testing.assert_close(ms.calculate_input(sigma, x_ve), x_vp, rtol=1e-5, atol=1e-5)
        ref = sch.step(out, t, x_vp).pred_original_sample
        torch.testing.assert_close(ms.calculate_denoised(sigma, out, x_ve), ref, rtol=1e-4, atol=1e-4)
        if prediction_type == "v_prediction":  # the training target is diffusers' velocity
            x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
            torch.testing.assert_close(ms.network_target(x0, noise, sigma),
                                       sch.get_velocity(x0, noise, t.reshape(1)), rtol=1e-5, atol=1e-5)


def test_flow_match_table_and_conversions():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ms = FlowMatch(shift=3.0)
    torch.testing.assert_close(ms.sigmas, ref.sigmas.flip(0), rtol=1e-5, atol=1e-6)
    x0, noise, s = torch.randn(3, 4), torch.randn(3, 4), 0.4
    x = ms.noise_scaling(s, noise, x0)
    torch.testing.assert_close(x, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(ms.calculate_denoised(s, ms.network_target(x0, noise, s), x), x0)
    assert float(ms.timestep(torch.tensor(0.25))) == 250.0
    assert model_sampling_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}).shift == 3.0


def test_karras_exponential_normal_by_formula(vp):
    n, lo, hi = 7, vp.sigma_min, vp.sigma_max
    r = np.linspace(0, 1, n)
    karras = (hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    torch.testing.assert_close(ss.karras(vp, n), torch.tensor(list(karras) + [0.0], dtype=torch.float32))
    expo = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    torch.testing.assert_close(ss.exponential(vp, n), torch.tensor(list(expo) + [0.0], dtype=torch.float32))
    # normal: timesteps evenly spaced 999 .. 0, log-sigma interpolated, then 0
    ts = np.linspace(999, 0, n)
    log_s = np.log(vp.sigmas.double().numpy())
    ref = [math.exp(np.interp(t, np.arange(1000), log_s)) for t in ts]
    torch.testing.assert_close(ss.normal(vp, n), torch.tensor(ref + [0.0], dtype=torch.float32))
    ts = np.linspace(999, 0, n + 1)[:-1]
    ref = [math.exp(np.interp(t, np.arange(1000), log_s)) for t in ts]
    torch.testing.assert_close(ss.sgm_uniform(vp, n), torch.tensor(ref + [0.0], dtype=torch.float32))


def test_simple_is_trailing_and_ddim_uniform_is_ddim_leading(vp):
    for n in (4, 10, 25):
        euler = _diffusers("EulerDiscreteScheduler", timestep_spacing="trailing")
        euler.set_timesteps(n)
        torch.testing.assert_close(ss.simple(vp, n), euler.sigmas.float(), rtol=1e-5, atol=0)
        ddim = _diffusers("DDIMScheduler")
        ddim.set_timesteps(n)
        ref = vp.sigmas[ddim.timesteps.long()]
        torch.testing.assert_close(ss.ddim_uniform(vp, n), torch.cat([ref, torch.zeros(1)]))


def test_beta_quantiles(vp):
    # the regularised incomplete beta function against a numerical integral of the density
    a = b = 0.6
    u = np.linspace(0, 1, 2_000_001)[1:-1]
    dens = u ** (a - 1) * (1 - u) ** (b - 1)
    cdf = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2) * (u[1] - u[0])])
    cdf /= cdf[-1]
    for x in (0.1, 0.3, 0.5, 0.8):
        assert ss._betainc(a, b, x) == pytest.approx(float(np.interp(x, u, cdf)), abs=2e-3)
        assert ss._beta_ppf(ss._betainc(a, b, x), a, b) == pytest.approx(x, abs=1e-9)
    assert ss._beta_ppf(0.5, a, b) == pytest.approx(0.5, abs=1e-12)
    sig = ss.beta(vp, 8)
    assert sig[0] == pytest.approx(vp.sigma_max) and float(sig[-1]) == 0.0 and len(sig) == 9
    assert torch.all(sig[:-1] > sig[1:])


def test_sigmas_for_denoise_rule_and_errors(vp):
    full = ss.calculate_sigmas(vp, "karras", 20)
    torch.testing.assert_close(ss.sigmas_for("karras", vp, 10, denoise=0.5), full[-11:])
    torch.testing.assert_close(ss.sigmas_for("karras", vp, 10), ss.calculate_sigmas(vp, "karras", 10))
    longer = ss.calculate_sigmas(vp, "normal", 11)
    torch.testing.assert_close(ss.sigmas_for("normal", vp, 10, sampler="dpm_2"), torch.cat([longer[:-2], longer[-1:]]))
    with pytest.raises(ValueError, match="unknown scheduler"):
        ss.calculate_sigmas(vp, "nope", 10)
    with pytest.raises(ValueError, match="denoise"):
        ss.sigmas_for("normal", vp, 10, denoise=0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        model_sampling_from_config({**SD, "prediction_type": "sample"})
    assert isinstance(vp, DiscreteVP)
