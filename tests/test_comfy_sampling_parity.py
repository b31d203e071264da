"""Our sigma lists and samplers equal ComfyUI's on the same inputs (a real ComfyUI tree, run in its own Python).

ComfyUI's ``comfy.samplers.calculate_sigmas`` (with ``comfy.model_sampling`` discrete-eps and discrete-flow
model sampling) and ``comfy.k_diffusion.sampling`` samplers run in a subprocess with ``COMFYUI_PYTHON`` and
``COMFYUI_DIR`` on ``sys.path``, on a toy denoiser and a fixed noise sequence; we compare to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rdt_lib import samplers
from rdt_lib.model_sampling import FlowMatch, model_sampling_from_config
from rdt_lib.sampling import starting_latent
from rdt_lib.sigma_schedules import SCHEDULER_NAMES, calculate_sigmas

pytestmark = pytest.mark.comfyui

STEPS = 9
SHIFT = 3.0
SAMPLERS_VP = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddpm"]
SAMPLERS_FLOW = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde"]
SCALE = [1.0, 0.8, 0.6]  # the toy denoiser: D(x, sigma) = x / (1 + sigma^2) * SCALE (per channel)

COMFY_SCRIPT = textwrap.dedent('''
    import json, sys, types
    sys.path.insert(0, sys.argv[1])
    spec_path = sys.argv[2]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_sampling as cms, comfy.samplers as csm, comfy.k_diffusion.sampling as ks

    spec = json.loads(open(spec_path).read())

    class VP(cms.ModelSamplingDiscrete, cms.EPS):
        pass

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    flow = Flow()
    flow.set_parameters(shift=spec["shift"])
    models = {"vp": VP(), "flow": flow}
    scale = torch.tensor(spec["scale"])[None, :, None]
    noise = torch.tensor(spec["noise"])
    x0 = torch.tensor(spec["x"])

    class Model:
        def __init__(self, ms):
            self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms),
                                                     model_patcher=types.SimpleNamespace(get_model_object=lambda n: ms))
        def __call__(self, x, sigma, **kw):
            return x / (1 + sigma[:, None, None] ** 2) * scale

    out = {"sigmas": {}, "samples": {}, "start": {}}
    for kind, ms in models.items():
        for name in spec["schedulers"]:
            out["sigmas"][kind + "/" + name] = csm.calculate_sigmas(ms, name, spec["steps"]).tolist()
        sig = csm.calculate_sigmas(ms, "karras" if kind == "vp" else "simple", spec["steps"])
        for name in spec["samplers_" + kind]:
            calls = {"n": 0}
            def noise_sampler(s, s_next):
                calls["n"] += 1
                return noise[calls["n"] - 1]
            fn = getattr(ks, "sample_" + name)
            res = fn(Model(ms), x0.clone() * float(sig[0]), sig, noise_sampler=noise_sampler, disable=True) \\
                if name not in ("euler", "heun", "dpmpp_2m") else fn(Model(ms), x0.clone() * float(sig[0]), sig, disable=True)
            out["samples"][kind + "/" + name] = {"x": res.tolist(), "draws": calls["n"], "sigmas": sig.tolist()}
        for max_denoise in (False, True):
            s0 = torch.tensor(float(ms.sigma_max) * (1 if max_denoise else 0.5))
            out["start"][kind + "/" + str(max_denoise)] = ms.noise_scaling(
                s0, x0.clone(), torch.full_like(x0, 0.25), max_denoise).tolist()
    print(json.dumps(out))
''')


def _comfy_env() -> tuple[str, str]:
    comfy_dir, python = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR is unset: eval \"$(bash scripts/comfyui_host.sh)\" to run the ComfyUI parity tests")
    if not python or not Path(comfy_dir, "comfy", "samplers.py").is_file():
        pytest.fail(f"COMFYUI_DIR={comfy_dir!r} / COMFYUI_PYTHON={python!r} do not point at a ComfyUI tree and its Python")
    return comfy_dir, python


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    comfy_dir, python = _comfy_env()
    g = torch.Generator().manual_seed(0)
    spec = {"steps": STEPS, "shift": SHIFT, "scale": SCALE, "schedulers": list(SCHEDULER_NAMES),
            "samplers_vp": SAMPLERS_VP, "samplers_flow": SAMPLERS_FLOW,
            "x": torch.randn(2, 3, 4, generator=g).tolist(), "noise": torch.randn(64, 2, 3, 4, generator=g).tolist()}
    tmp = tmp_path_factory.mktemp("comfy")
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "run.py").write_text(COMFY_SCRIPT)
    proc = subprocess.run([python, str(tmp / "run.py"), comfy_dir, str(tmp / "spec.json")], cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return spec, json.loads(proc.stdout.strip().splitlines()[-1])


def _ours(kind):
    return model_sampling_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}) \
        if kind == "vp" else FlowMatch(shift=SHIFT)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
def test_sigma_lists_equal_comfyui(comfy, kind, name):
    _, out = comfy
    ref = torch.tensor(out["sigmas"][f"{kind}/{name}"])
    torch.testing.assert_close(calculate_sigmas(_ours(kind), name, STEPS), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,name", [("vp", n) for n in SAMPLERS_VP] + [("flow", n) for n in SAMPLERS_FLOW])
def test_samplers_equal_comfyui(comfy, kind, name):
    spec, out = comfy
    ref = out["samples"][f"{kind}/{name}"]
    sig = torch.tensor(ref["sigmas"])
    noise = torch.tensor(spec["noise"])
    scale = torch.tensor(SCALE)[None, :, None]
    draws = []

    def noise_sampler(s, s_next):
        draws.append(1)
        return noise[len(draws) - 1]

    def den(x, sigma):
        return x / (1 + sigma[:, None, None] ** 2) * scale

    ms = _ours(kind)
    got = samplers.SAMPLERS[name](den, torch.tensor(spec["x"]) * float(sig[0]), sig, noise_sampler=noise_sampler,
                                  model_sampling=ms)
    expected = torch.tensor(ref["x"])
    assert len(draws) == ref["draws"]
    other = samplers.sample_euler(den, torch.tensor(spec["x"]) * float(sig[0]), sig)
    if name != "euler":
        assert (other - expected).abs().max() > 1e-4  # the samplers really differ
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("max_denoise", [False, True])
def test_starting_latent_equals_comfyui_noise_scaling(comfy, kind, max_denoise):
    spec, out = comfy
    ms = _ours(kind)
    s0 = ms.sigma_max * (1 if max_denoise else 0.5)
    x = torch.tensor(spec["x"])
    got = starting_latent(ms, torch.tensor([s0, 0.0]), x, torch.full_like(x, 0.25))  # the rule picks max_denoise
    torch.testing.assert_close(got, torch.tensor(out["start"][f"{kind}/{max_denoise}"]), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
