"""Dual-model mixing is exact: checked against plain reference loops written here, on the toy backbone.

References use separate copies of the network (the base weights before the LoRA was added, and the
LoRA network called directly) wrapped into sigma-space denoisers by hand (input ``x / sqrt(1 + sigma^2)``, the
nearest training timestep, ``x0 = x - sigma * eps``), never the mixer or the denoiser wrappers under test.
"""

import copy

import pytest
import torch

from rdt_lib import samplers
from rdt_lib.backbones import ToyBackbone, ToyDenoiser
from rdt_lib.backbones.toy2d import TOY_LORA_TARGETS
from rdt_lib.denoisers import ModelBranch
from rdt_lib.lora import add_lora, lora_layers, use_adapters
from rdt_lib.sampling import SAMPLERS, initial_noise, sample

N_STEPS = 12
BATCH = 6


@pytest.fixture()
def models():
    torch.manual_seed(0)
    net = ToyDenoiser(hidden=32)
    base_copy = copy.deepcopy(net).eval()
    bb = ToyBackbone(net)
    add_lora(net, "tuned", rank=4, target_modules=TOY_LORA_TARGETS, init_lora_weights=False)
    with torch.no_grad():  # make the adapter matter: non-zero up-projections
        for layer in lora_layers(net):
            layer.lora_B["tuned"].weight.normal_(0, 0.3)
    net.eval()
    return bb, base_copy, net


def _train_sigmas(bb):
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(bb.scheduler_config).alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def hand_denoiser(bb, net):
    """``(x, sigma) -> x0`` for an eps network, written out: VP input scaling, nearest timestep in log-sigma."""
    log_table = _train_sigmas(bb).log()

    def d(x, sigma):
        s = sigma.double()
        t = (s.log()[None, :] - log_table[:, None]).abs().argmin(dim=0).float()
        eps = net((x / (s[:, None] ** 2 + 1) ** 0.5).float(), t)
        return x - s[:, None].float() * eps

    return d


def reference_run(bb, sampler, weight_fn, base_net, tuned_net, sigmas, seeds=0, **kw):
    """Our sampler function over a hand-written mix: weight_fn(i, n) with i the first index of sigma in the list,
    or the step whose interval holds it (the intermediate sigma of dpmpp_sde)."""
    base_d, tuned_d = hand_denoiser(bb, base_net), hand_denoiser(bb, tuned_net)
    table = sigmas.tolist()
    n = len(table) - 1

    def mixed(x, sigma):
        s = float(sigma[0])
        i = table.index(s) if s in table[:n] else next(j for j in range(n) if table[j] > s > table[j + 1])
        w = weight_fn(i, n)
        if w == 0:
            return base_d(x, sigma)
        if w == 1:
            return tuned_d(x, sigma)
        return (1 - w) * base_d(x, sigma) + w * tuned_d(x, sigma)

    noise, gens = initial_noise((2,), [seeds + b for b in range(BATCH)])
    x = noise * (1 + sigmas[0] ** 2) ** 0.5  # "normal" starts at sigma_max: a full denoise
    with torch.no_grad():
        return samplers.SAMPLERS[sampler](mixed, x, sigmas, noise_sampler=samplers.RowNoise(gens, (2,)), **kw)


def run(bb, schedule, sampler="ddim", batched=True, tuned_branch=None, **kw):
    tuned = tuned_branch or ModelBranch(bb, adapter="tuned")
    return sample(bb, [""] * BATCH, tuned=tuned, schedule=schedule, sampler=sampler, num_steps=N_STEPS,
                  seeds=0, decode=False, batched=batched, **kw)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_base_and_tuned_equal_the_hand_written_denoisers(models, sampler):
    bb, base_net, lora_net = models
    got = run(bb, "base", sampler)
    ref_base = reference_run(bb, sampler, lambda i, n: 0.0, base_net, lora_net, got.sigmas)
    torch.testing.assert_close(got.latents, ref_base, rtol=0, atol=1e-5)
    got_tuned = run(bb, "tuned", sampler).latents
    ref_tuned = reference_run(bb, sampler, lambda i, n: 1.0, base_net, lora_net, got.sigmas)
    torch.testing.assert_close(got_tuned, ref_tuned, rtol=0, atol=1e-5)
    assert (got.latents - got_tuned).abs().max() > 1e-2  # the adapter really changes the result


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "euler_ancestral", "heun", "dpmpp_sde"])
def test_switch_equals_base_then_tuned(models, sampler):
    bb, base_net, lora_net = models
    k = 7
    got = run(bb, f"switch:{k}", sampler)
    ref = reference_run(bb, sampler, lambda i, n: float(i >= k), base_net, lora_net, got.sigmas)
    # one sampler throughout: multistep history kept across the switch; heun's second evaluation at
    # sigmas[i + 1] belongs to step i + 1 (step index from sigma, not from counting calls)
    torch.testing.assert_close(got.latents, ref, rtol=0, atol=1e-5)
    base_only = reference_run(bb, sampler, lambda i, n: 0.0, base_net, lora_net, got.sigmas)
    assert (base_only - ref).abs().max() > 1e-3


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_linear_step_is_the_hand_computed_mix(models, batched, sampler):
    bb, base_net, lora_net = models
    got = run(bb, "linear", sampler, batched=batched)
    ref = reference_run(bb, sampler, lambda i, n: i / n, base_net, lora_net, got.sigmas)
    torch.testing.assert_close(got.latents, ref, rtol=0, atol=1e-5)


def test_ddim_eta_per_step(models):
    """R0's random eta: a per-step eta callable reaches the DDIM step (eta 0 / 1 at alternate steps)."""
    bb, base_net, lora_net = models
    eta = lambda i: float(i % 2)  # noqa: E731
    got = run(bb, "tuned", "ddim", eta=eta)
    ref = reference_run(bb, "ddim", lambda i, n: 1.0, base_net, lora_net, got.sigmas, eta=eta)
    torch.testing.assert_close(got.latents, ref, rtol=0, atol=1e-5)
    assert (run(bb, "tuned", "ddim").latents - got.latents).abs().max() > 1e-3


def test_one_mixed_step_by_hand(models):
    """A single evaluation of `linear` at step index 3 of 4: (1 - 3/4) * base + 3/4 * tuned, in x0."""
    bb, base_net, lora_net = models
    from rdt_lib.denoisers import GuidedDenoiser, joint_denoiser
    from rdt_lib.mix import DualDenoiser

    cond = bb.encode_prompts([""] * BATCH)
    base = GuidedDenoiser(ModelBranch(bb), cond, None)
    tuned = GuidedDenoiser(ModelBranch(bb, "tuned"), cond, None)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    x = torch.randn(BATCH, 2)
    sigma = torch.full((BATCH,), 1.0)
    expected_base, expected_tuned = hand_denoiser(bb, base_net)(x, sigma), hand_denoiser(bb, lora_net)(x, sigma)
    with torch.no_grad():
        for joint in (None, joint_denoiser(base, tuned)):
            den = DualDenoiser(base, tuned, "linear", sigmas=sigmas, joint=joint)
            got = den(x, sigma)
            torch.testing.assert_close(got, 0.25 * expected_base + 0.75 * expected_tuned, rtol=0, atol=1e-6)


class CountingToy(ToyBackbone):
    def __init__(self, network):
        super().__init__(network)
        self.calls = []

    def forward_network(self, x, t, cond):
        # record which adapter each row used: the base weights when every adapter is disabled
        layer = lora_layers(self.network)[0]
        self.calls.append((x.shape[0], "base" if layer.disable_adapters else ",".join(layer.active_adapters)))
        return super().forward_network(x, t, cond)


def test_zero_weight_model_is_never_evaluated(models):
    _, _, lora_net = models
    bb = CountingToy(lora_net)
    res = sample(bb, [""] * BATCH, tuned=ModelBranch(bb, "tuned"), schedule="switch@0.5", num_steps=10, decode=False)
    assert bb.calls == [(BATCH, "base")] * 5 + [(BATCH, "tuned")] * 5
    assert res.evaluations == {"base": 5, "tuned": 5, "joint": 0}
    bb.calls.clear()
    # heun: two evaluations per step except the last (to sigma 0); the second one, at sigmas[i + 1], gets step
    # i + 1's weight: base at steps 0-4 (5 first + 4 second evaluations), tuned from sigmas[5] on (1 + 5 + 4)
    res = sample(bb, [""] * BATCH, tuned=ModelBranch(bb, "tuned"), schedule="switch:5", sampler="heun",
                 num_steps=10, decode=False)
    assert res.evaluations == {"base": 5 + 4, "tuned": 1 + 5 + 4, "joint": 0}
    bb.calls.clear()
    sample(bb, [""] * BATCH, tuned=ModelBranch(bb, "tuned"), schedule="base", num_steps=10, decode=False)
    assert bb.calls == [(BATCH, "base")] * 10
    bb.calls.clear()
    # power:2 at step 0 has weight 0: one base-only call, then 9 joint (batched) calls of 2B rows
    res = sample(bb, [""] * BATCH, tuned=ModelBranch(bb, "tuned"), schedule="power:2", num_steps=10, decode=False)
    assert [c[0] for c in bb.calls] == [BATCH] + [2 * BATCH] * 9
    assert res.evaluations == {"base": 1, "tuned": 0, "joint": 9}


def test_single_copy_lora_equals_merged_two_copy(models):
    bb, base_net, lora_net = models
    merged = copy.deepcopy(lora_net)
    for layer in lora_layers(merged):
        layer.merge(adapter_names=["tuned"])
    # a plain network (no LoRA layers) holding the merged weights: the second copy
    plain = copy.deepcopy(base_net)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if "lora_" not in k})
    assert not lora_layers(plain)
    merged_bb = ToyBackbone(plain)
    base_bb = ToyBackbone(base_net)
    for schedule in ["linear", "power:2", "switch@0.5", "tuned"]:
        one_copy = run(bb, schedule).latents
        two_copy = sample(base_bb, [""] * BATCH, tuned=ModelBranch(merged_bb), schedule=schedule, sampler="ddim",
                          num_steps=N_STEPS, decode=False).latents
        torch.testing.assert_close(one_copy, two_copy, rtol=0, atol=1e-5)


def test_lora_scale_baseline(models):
    bb, base_net, lora_net = models
    # scale 0 is the base model; scale 0.5 equals halving every up-projection
    zero = run(bb, "tuned", tuned_branch=ModelBranch(bb, "tuned", lora_scale=0.0)).latents
    torch.testing.assert_close(zero, run(bb, "base").latents, rtol=0, atol=1e-6)
    half_net = copy.deepcopy(lora_net)
    with torch.no_grad():
        for layer in lora_layers(half_net):
            layer.lora_B["tuned"].weight.mul_(0.5)
    half = run(bb, "tuned", tuned_branch=ModelBranch(bb, "tuned", lora_scale=0.5))
    ref = reference_run(bb, "ddim", lambda i, n: 1.0, base_net, half_net, half.sigmas)
    torch.testing.assert_close(half.latents, ref, rtol=0, atol=1e-5)
    # the scale is undone afterwards
    full = run(bb, "tuned")
    torch.testing.assert_close(full.latents, reference_run(bb, "ddim", lambda i, n: 1.0, base_net, lora_net, full.sigmas),
                               rtol=0, atol=1e-5)


def test_adapter_switching_keeps_trainability(models):
    _, _, net = models
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    for choice in (None, "tuned", [None, "tuned"] * 3):
        with use_adapters(net, choice):
            net(torch.zeros(6, 2), torch.zeros(6))
        assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        with use_adapters(net, "nope"):
            pass


def test_bad_inputs(models):
    bb, _, _ = models
    with pytest.raises(ValueError, match="unconditional"):
        sample(bb, [""] * 2, tuned=ModelBranch(bb, "tuned", cfg_scale=7.5))
    with pytest.raises(ValueError, match="needs a tuned model"):
        sample(bb, [""] * 2, schedule="linear")
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(bb, [""] * 2, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample(bb, [""] * 2, scheduler="heun")
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(bb, [""] * 2, sampler="lms")
    with pytest.raises(ValueError, match="eta applies to the stochastic samplers"):
        sample(bb, [""] * 2, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="prompts is empty"):
        sample(bb, [])


def test_adapter_added_later_is_seen(models):
    """The LoRA-layer cache is renewed when another adapter is injected."""
    bb, _, net = models
    x, t = torch.randn(4, 2), torch.full((4,), 500.0)
    with torch.no_grad():
        with use_adapters(net, "tuned"):
            tuned = net(x, t)
        add_lora(net, "other", rank=2, target_modules=TOY_LORA_TARGETS, init_lora_weights=False)
        with use_adapters(net, "other"):
            other = net(x, t)
        with use_adapters(net, ["tuned", "tuned", "other", "other"]):
            mixed = net(x, t)
    assert not torch.allclose(tuned, other)
    torch.testing.assert_close(mixed[:2], tuned[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2:], other[2:], rtol=0, atol=1e-6)
