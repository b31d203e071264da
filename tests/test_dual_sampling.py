"""Dual-model mixing is exact: checked against plain reference loops written here, on the toy backbone.

References use separate copies of the network (the base weights before the LoRA was added, and the
LoRA network called directly), never the mixer under test.
"""

import copy

import pytest
import torch

from rdt_lib.backbones import ToyBackbone, ToyDenoiser
from rdt_lib.backbones.toy2d import TOY_LORA_TARGETS
from rdt_lib.dual import ModelBranch
from rdt_lib.lora import add_lora, lora_layers, use_adapters
from rdt_lib.sampling import SCHEDULERS, initial_noise, make_scheduler, sample

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


def reference_loop(bb, scheduler_name, weight_fn, base_net, tuned_net, seeds=0, eta=0.0):
    """Plain sampler: weight_fn(i, n) mixes base_net and tuned_net outputs (evaluated separately)."""
    sch = make_scheduler(scheduler_name, bb.scheduler_config)
    sch.set_timesteps(N_STEPS)
    noise, gens = initial_noise((2,), [seeds + b for b in range(BATCH)])
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            xin = sch.scale_model_input(x, t)
            tt = t.reshape(1).expand(BATCH)
            w = weight_fn(i, N_STEPS)
            if w == 0:
                pred = base_net(xin, tt)
            elif w == 1:
                pred = tuned_net(xin, tt)
            else:
                pred = (1 - w) * base_net(xin, tt) + w * tuned_net(xin, tt)
            kwargs = {"generator": gens} if "generator" in sch.step.__code__.co_varnames else {}
            if "eta" in sch.step.__code__.co_varnames:
                kwargs["eta"] = eta
            x = sch.step(pred, t, x, **kwargs).prev_sample
    return x


def run(bb, schedule, scheduler="ddim", batched=True, tuned_branch=None):
    tuned = tuned_branch or ModelBranch(bb, adapter="tuned")
    return sample(bb, [""] * BATCH, tuned=tuned, schedule=schedule, scheduler=scheduler, num_steps=N_STEPS,
                  seeds=0, decode=False, batched=batched)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_base_and_tuned_are_bit_exact(models, scheduler):
    bb, base_net, lora_net = models
    got_base = run(bb, "base", scheduler).latents
    ref_base = reference_loop(bb, scheduler, lambda i, n: 0.0, base_net, lora_net)
    assert torch.equal(got_base, ref_base)
    got_tuned = run(bb, "tuned", scheduler).latents
    ref_tuned = reference_loop(bb, scheduler, lambda i, n: 1.0, base_net, lora_net)
    assert torch.equal(got_tuned, ref_tuned)
    assert not torch.allclose(got_base, got_tuned)  # the adapter really changes the result


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmpp_2m", "euler_a"])
def test_switch_equals_base_then_tuned(models, scheduler):
    bb, base_net, lora_net = models
    k = 7
    got = run(bb, f"switch:{k}", scheduler).latents
    ref = reference_loop(bb, scheduler, lambda i, n: float(i >= k), base_net, lora_net)
    assert torch.equal(got, ref)  # one scheduler throughout: multistep history kept across the switch


@pytest.mark.parametrize("batched", [True, False])
def test_linear_step_is_the_hand_computed_mix(models, batched):
    bb, base_net, lora_net = models
    got = run(bb, "linear", "ddim", batched=batched).latents
    ref = reference_loop(bb, "ddim", lambda i, n: i / n, base_net, lora_net)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_one_mixed_step_by_hand(models):
    """A single step of `linear` at step index 3 of 4: (1 - 3/4) * base + 3/4 * tuned."""
    bb, base_net, lora_net = models
    from rdt_lib.dual import DualModelDenoiser, GuidedModel

    cond = bb.encode_prompts([""] * BATCH)
    den = DualModelDenoiser(GuidedModel(ModelBranch(bb), cond, None),
                            GuidedModel(ModelBranch(bb, "tuned"), cond, None), "linear")
    x = torch.randn(BATCH, 2)
    t = torch.tensor(300)
    with torch.no_grad():
        got = den(x, t, 3, 4)
        expected = 0.25 * base_net(x, t.expand(BATCH)) + 0.75 * lora_net(x, t.expand(BATCH))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


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
        two_copy = sample(base_bb, [""] * BATCH, tuned=ModelBranch(merged_bb), schedule=schedule,
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
    half = run(bb, "tuned", tuned_branch=ModelBranch(bb, "tuned", lora_scale=0.5)).latents
    ref = reference_loop(bb, "ddim", lambda i, n: 1.0, base_net, half_net)
    torch.testing.assert_close(half, ref, rtol=0, atol=1e-6)
    # the scale is undone afterwards
    torch.testing.assert_close(run(bb, "tuned").latents, reference_loop(bb, "ddim", lambda i, n: 1.0, base_net, lora_net))


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
