"""Every sampler's step against the formula written out by hand (or diffusers' own step) on a tiny case.

The denoiser is the exact one for unit-Gaussian data, ``D(x, sigma) = x / (1 + sigma^2)``, scaled per
coordinate so rows differ; noise comes from a fixed sampler so stochastic steps are reproducible.
"""

import math

import pytest
import torch

from rdt_lib import samplers
from rdt_lib.model_sampling import FlowMatch, model_sampling_from_config

SIGMAS = torch.tensor([2.0, 1.0, 0.5, 0.0])
X = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
Z = torch.tensor([[0.3, -0.7], [1.1, 0.2]])  # the "fresh noise" of every draw


def D(x, sigma):
    return x / (1 + sigma[:, None] ** 2) * torch.tensor([1.0, 0.8])


def fixed_noise(sigma, sigma_next):
    return Z


def run(name, sigmas=SIGMAS, x=X, **kw):
    return samplers.SAMPLERS[name](D, x.clone(), sigmas, **kw)


def d_of(x, s):
    return D(x, torch.full((x.shape[0],), s))


def test_euler_step():
    x = X
    for s, s_next in [(2.0, 1.0), (1.0, 0.5), (0.5, 0.0)]:
        x = x + (x - d_of(x, s)) / s * (s_next - s)
    torch.testing.assert_close(run("euler"), x)


def test_heun_step():
    x = X
    for s, s_next in [(2.0, 1.0), (1.0, 0.5), (0.5, 0.0)]:
        d = (x - d_of(x, s)) / s
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x2 = x + d * (s_next - s)
            d2 = (x2 - d_of(x2, s_next)) / s_next
            x = x + (d + d2) / 2 * (s_next - s)
    torch.testing.assert_close(run("heun"), x)


def test_dpmpp_2m_step():
    x = X
    d0 = d_of(x, 2.0)
    h = math.log(2.0 / 1.0)
    x = 0.5 * x - math.expm1(-h) * d0  # first step: first order
    d1 = d_of(x, 1.0)
    h2 = math.log(1.0 / 0.5)
    r = h / h2
    x = 0.5 * x - math.expm1(-h2) * ((1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0)
    x = d_of(x, 0.5)  # last step to 0: the denoised estimate
    torch.testing.assert_close(run("dpmpp_2m"), x)


@pytest.mark.parametrize("name", ["euler_ancestral", "ddim"])
def test_ancestral_step(name):
    eta = 0.7
    x = X
    for s, s_next in [(2.0, 1.0), (1.0, 0.5), (0.5, 0.0)]:
        up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        down = math.sqrt(s_next ** 2 - up ** 2)
        den = d_of(x, s)
        x = den if down == 0 else x + (x - den) / s * (down - s) + Z * up
    torch.testing.assert_close(run(name, eta=eta, noise_sampler=fixed_noise), x)


def test_ddim_with_eta_equals_diffusers_ddim_step():
    """DDIM's stochastic step in diffusers' variance-preserving frame equals ours in sigma space."""
    from diffusers import DDIMScheduler

    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": True,
           "clip_sample": False, "steps_offset": 1, "timestep_spacing": "leading"}
    sch = DDIMScheduler(**cfg)
    sch.set_timesteps(4)
    ac = sch.alphas_cumprod
    t, t_prev = int(sch.timesteps[1]), int(sch.timesteps[2])
    s, s_prev = float(((1 - ac[t]) / ac[t]) ** 0.5), float(((1 - ac[t_prev]) / ac[t_prev]) ** 0.5)
    x_ve = X * 3.0
    eps = (x_ve - d_of(x_ve, s)) / s  # the eps our denoiser implies
    for eta in (0.0, 0.5, 1.0):
        ref = sch.step(eps, t, x_ve / math.sqrt(1 + s ** 2), eta=eta, variance_noise=Z).prev_sample
        ours = samplers.sample_ddim(D, x_ve.clone(), torch.tensor([s, s_prev]), eta=eta, noise_sampler=fixed_noise)
        torch.testing.assert_close(ours / math.sqrt(1 + s_prev ** 2), ref, rtol=0, atol=1e-5)


def test_ddpm_step_equals_diffusers_ddpm_step():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        timestep_spacing="leading", steps_offset=1)
    sch.set_timesteps(4)
    ac = sch.alphas_cumprod
    t = int(sch.timesteps[1])
    t_prev = int(sch.previous_timestep(t))
    s, s_prev = float(((1 - ac[t]) / ac[t]) ** 0.5), float(((1 - ac[t_prev]) / ac[t_prev]) ** 0.5)
    x_ve = X[:1] * 3.0
    eps = (x_ve - d_of(x_ve, s)) / s
    ref = sch.step(eps, t, x_ve / math.sqrt(1 + s ** 2), generator=torch.Generator().manual_seed(5)).prev_sample
    noise = samplers.RowNoise([torch.Generator().manual_seed(5)], (2,))
    ours = samplers.sample_ddpm(D, x_ve.clone(), torch.tensor([s, s_prev]), noise_sampler=noise)
    torch.testing.assert_close(ours / math.sqrt(1 + s_prev ** 2), ref, rtol=0, atol=1e-5)


def test_dpmpp_2m_sde_step():
    eta = 1.0
    x, old, h_last = X, None, None
    for s, s_next in [(2.0, 1.0), (1.0, 0.5), (0.5, 0.0)]:
        den = d_of(x, s)
        h = None
        if s_next == 0:
            x = den
        else:
            h = math.log(s) - math.log(s_next)
            x = s_next / s * math.exp(-h * eta) * x - math.expm1(-h * (eta + 1)) * den
            if old is not None:
                x = x + 0.5 * -math.expm1(-h * (eta + 1)) * (h / h_last) ** -1 * (den - old) * 1.0
            x = x + Z * s_next * math.sqrt(-math.expm1(-2 * h * eta))
        old, h_last = den, h
    torch.testing.assert_close(run("dpmpp_2m_sde", eta=eta, noise_sampler=fixed_noise), x)


def test_dpmpp_sde_step_without_noise_is_dpm_solver_2():
    """eta 0: DPM-Solver++(2S) with the midpoint r = 1/2 in log-sigma, two evaluations per step."""
    x = X
    for s, s_next in [(2.0, 1.0), (1.0, 0.5), (0.5, 0.0)]:
        den = d_of(x, s)
        if s_next == 0:
            x = den
            continue
        s_mid = math.sqrt(s * s_next)  # lambda halfway
        x2 = (s_mid / s) * x - math.expm1(-(math.log(s) - math.log(s_mid))) * den
        den2 = d_of(x2, s_mid)
        x = (s_next / s) * x - math.expm1(-(math.log(s) - math.log(s_next))) * den2
    torch.testing.assert_close(run("dpmpp_sde", eta=0.0), x, rtol=1e-6, atol=1e-6)


def test_flow_euler_ancestral_is_the_rectified_flow_step():
    eta = 0.5
    sig = torch.tensor([0.9, 0.6, 0.0])
    x = X
    for s, s_next in [(0.9, 0.6), (0.6, 0.0)]:
        den = d_of(x, s)
        if s_next == 0:
            x = den
            continue
        down = s_next * (1 + (s_next / s - 1) * eta)
        a_next, a_down = 1 - s_next, 1 - down
        x = (down / s) * x + (1 - down / s) * den
        x = (a_next / a_down) * x + Z * math.sqrt(s_next ** 2 - down ** 2 * a_next ** 2 / a_down ** 2)
    got = samplers.sample_euler_ancestral(D, X.clone(), sig, eta=eta, noise_sampler=fixed_noise,
                                          model_sampling=FlowMatch(shift=3.0))
    torch.testing.assert_close(got, x)


def test_callback_sees_denoised_and_heun_evaluates_at_both_sigmas():
    seen, calls = [], []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return D(x, sigma)

    samplers.sample_heun(counting, X.clone(), SIGMAS, callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 2]
    assert calls == [2.0, 1.0, 1.0, 0.5, 0.5]  # the second evaluation of step i is at sigmas[i + 1]
    torch.testing.assert_close(seen[0]["denoised"], d_of(X, 2.0))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_gradients_flow_only_through_chosen_steps():
    w = torch.tensor(1.0, requires_grad=True)

    def den(x, sigma):
        return D(x, sigma) * w

    assert not samplers.sample_euler(den, X.clone(), SIGMAS, grad_steps=lambda i: i == 0).requires_grad
    for chosen in ([2], [1, 2], [0, 1, 2]):
        out = samplers.sample_euler(den, X.clone(), SIGMAS, grad_steps=lambda i: i in chosen)
        (g,) = torch.autograd.grad(out.sum(), [w])
        # reference: the same run where the non-chosen steps see a detached weight
        x = X.clone()
        wd = w.detach()
        for i, (s, s_next) in enumerate([(2.0, 1.0), (1.0, 0.5), (0.5, 0.0)]):
            ww = w if i in chosen else wd
            x = (x if i in chosen else x.detach())
            x = x + (x - d_of(x, s) * ww) / s * (s_next - s)
        (g_ref,) = torch.autograd.grad(x.sum(), [w])
        torch.testing.assert_close(g, g_ref)
    g_last = torch.autograd.grad(samplers.sample_euler(den, X.clone(), SIGMAS, grad_steps=lambda i: i == 2).sum(), [w])
    g_all = torch.autograd.grad(samplers.sample_euler(den, X.clone(), SIGMAS, grad_steps=lambda i: True).sum(), [w])
    assert abs(float(g_last[0]) - float(g_all[0])) > 1e-3


def test_row_noise_does_not_depend_on_the_batch():
    pair = samplers.RowNoise([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], (3,))
    alone = samplers.RowNoise([torch.Generator().manual_seed(2)], (3,))
    for _ in range(3):
        torch.testing.assert_close(pair(1.0, 0.5)[1:], alone(1.0, 0.5), rtol=0, atol=0)


def test_unknown_sampler_and_flow_ddpm_are_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.get_sampler("lms")
    with pytest.raises(ValueError, match="VP"):
        samplers.sample_ddpm(D, X.clone(), SIGMAS, model_sampling=FlowMatch())
    assert model_sampling_from_config({"prediction_type": "epsilon"}).prediction == "eps"
