"""Two processes on CPU (gloo) through ``accelerate launch`` train one LoRA equal to a one-process run with the
same global batch, and save checkpoints without hanging."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rdt_lib.lora_io import load_lora_safetensors
from rdt_lib.train.checkpoint import CheckpointManager
from rdt_lib.train.run import train_from_config
from train_fixtures import tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def _launcher() -> list[str] | None:
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if Path(exe).exists():
        # --multi_gpu selects accelerate's torchrun launcher; without GPUs the processes run on CPU with gloo
        # (accelerate's --cpu flag would pick its single-process / mpirun launcher instead).
        return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_same_global_batch(tmp_path):
    launcher = _launcher()
    if launcher is None:
        pytest.skip("neither accelerate nor torch.distributed.run is available")
    extra = {"run.max_steps": 2, "optim.lr": 2e-2, "checkpoint.every": 1, "optim.grad_accum": 2,
             "regularizers.kl_coeff": 0.5, "optim.eps": 1e-3}
    cmd = launcher + ["-m", "rdt_lib.train", "--config", "tiny_cpu"]
    for item in tiny_overrides(tmp_path / "two", **{**extra, "optim.batch_size": 1}):
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    manager = CheckpointManager(tmp_path / "two")
    assert manager.latest().name == "checkpoint-2"
    assert len(manager.load()["rng"]) == 2  # one RNG state per process

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train_from_config(tiny_config(tmp_path / "one", **{**extra, "optim.batch_size": 2}))
    a, _ = load_lora_safetensors(tmp_path / "two" / "lora.safetensors")
    b, _ = load_lora_safetensors(one.lora_path)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(b[k].abs().max().item() for k in b)
    print(f"2-process vs 1-process max abs diff {diff:.3g} (weights up to {scale:.3g})")
    assert diff < 1e-5
