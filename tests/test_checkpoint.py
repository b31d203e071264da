"""Crash-safe checkpoints: atomic writes, rotation, round trips, RNG restore, several processes."""

from __future__ import annotations

import errno
import os
import random
from datetime import timedelta

import numpy as np
import pytest
import torch

from rdt_lib.train import checkpoint as ckpt
from rdt_lib.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    check_weights_only_safe,
    restore_rng_state,
)


def _state(value: float) -> dict:
    return {
        "lora": {"a.lora_A.weight": torch.full((2, 3), value), "a.lora_B.weight": torch.full((3, 2), -value)},
        "trainer": {"step": int(value), "history": [value, value * 2], "name": "run"},
    }


def _assert_state(loaded: dict, value: float) -> None:
    assert torch.equal(loaded["lora"]["a.lora_A.weight"], torch.full((2, 3), value))
    assert torch.equal(loaded["lora"]["a.lora_B.weight"], torch.full((3, 2), -value))
    assert loaded["trainer"] == {"step": int(value), "history": [value, value * 2], "name": "run"}


def _listing(path) -> list[str]:
    return sorted(os.listdir(path))


def test_save_load_round_trip_with_metadata_and_extra_files(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    assert m.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        m.load()
    path = m.save(7, _state(7.0), metadata={"config_hash": "abc", "objective": "draft"},
                  extra_files={"config.toml": "[optim]\nlr = 0.1\n"})
    assert path == tmp_path / "checkpoint-7" and m.latest() == path
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-7"
    assert _listing(path) == ["config.toml", "lora.safetensors", "meta.json", "trainer.pt"]
    loaded = m.load()
    _assert_state(loaded, 7.0)
    assert loaded["meta"]["step"] == 7 and loaded["meta"]["config_hash"] == "abc"
    assert (path / "config.toml").read_text() == "[optim]\nlr = 0.1\n"
    assert CheckpointManager.step_of(path) == 7


def test_real_optimizer_and_scheduler_state_round_trip(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.8, 0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
        return model, opt, sched

    def train(model, opt, sched, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(8, 4, generator=g)
            loss = (model(x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    model, opt, sched = make()
    train(model, opt, sched, 3, seed=1)
    m = CheckpointManager(tmp_path)
    m.save(3, {"model": dict(model.state_dict()), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()})
    train(model, opt, sched, 4, seed=2)  # the uninterrupted run

    model2, opt2, sched2 = make()
    state = m.load()  # weights_only=True under the hood
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["lr_scheduler"])
    assert opt2.state_dict()["state"][0]["step"] == 3
    train(model2, opt2, sched2, 4, seed=2)  # the resumed run
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=1)
    first = m.save(1, _state(1.0))

    def disk_full(path, obj):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_torch", disk_full)
    with pytest.raises(OSError, match="No space left"):
        m.save(2, _state(2.0))
    monkeypatch.undo()
    assert m.latest() == first
    _assert_state(m.load(), 1.0)
    assert _listing(tmp_path) == ["checkpoint-1", "latest"]  # no new directory, no temporary left behind


def test_failing_fsync_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=1)
    first = m.save(1, _state(1.0))
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_fails_third_time(fd):
        calls["n"] += 1
        if calls["n"] == 3:  # while writing meta.json of the new checkpoint
            raise OSError(errno.EIO, "I/O error")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync_fails_third_time)
    with pytest.raises(OSError, match="I/O error"):
        m.save(2, _state(2.0))
    monkeypatch.undo()
    assert m.latest() == first and (first / "meta.json").is_file()
    _assert_state(m.load(), 1.0)


def test_crash_before_pointer_update_keeps_committed_checkpoint(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=1)
    first = m.save(1, _state(1.0))

    def die(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_text_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        m.save(2, _state(2.0))
    monkeypatch.undo()
    # the new directory is complete, but the commit point (the pointer) was not reached: the old one is kept
    assert (tmp_path / "checkpoint-2" / "meta.json").is_file()
    assert m.latest() == first
    _assert_state(m.load(), 1.0)
    # a dangling pointer (checkpoint deleted by hand) falls back to the newest complete checkpoint
    (tmp_path / "latest").write_text("checkpoint-99\n")
    assert m.latest() == tmp_path / "checkpoint-2"


def test_leftovers_of_a_killed_process_are_ignored_and_cleaned(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    first = m.save(1, _state(1.0))
    stale = tmp_path / ".tmp-checkpoint-2-deadbeef"
    stale.mkdir()
    (stale / "lora.safetensors").write_bytes(b"trunc")
    incomplete = tmp_path / "checkpoint-3"  # no meta.json: never finished
    incomplete.mkdir()
    (incomplete / "trainer.pt").write_bytes(b"trunc")
    (tmp_path / "latest").unlink()
    assert m.latest() == first and m.checkpoints() == [first]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        m.load(incomplete)
    second = m.save(4, _state(4.0))
    assert not stale.exists() and m.latest() == second
    assert m.checkpoints() == [first, second]


def test_rotation_keeps_the_last_complete_checkpoints(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        m.save(step, _state(float(step)))
    assert _listing(tmp_path) == ["checkpoint-4", "checkpoint-5", "latest"]
    assert m.latest() == tmp_path / "checkpoint-5"
    m.save(5, _state(50.0))  # the same step again replaces it
    assert _listing(tmp_path) == ["checkpoint-4", "checkpoint-5", "latest"]
    _assert_state(m.load(), 50.0)
    # a run restarted from an older step: save order, not the step number, decides what is newest
    m.save(2, _state(2.0))
    assert _listing(tmp_path) == ["checkpoint-2", "checkpoint-5", "latest"]
    assert m.latest() == tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)


def test_unsafe_state_is_rejected_before_writing(tmp_path):
    m = CheckpointManager(tmp_path / "out")
    with pytest.raises(TypeError, match=r"state\['trainer'\]\['arr'\]: numpy.ndarray cannot be loaded with weights_only"):
        m.save(1, {"trainer": {"arr": np.zeros(3)}})
    with pytest.raises(ValueError, match="reserved"):
        m.save(1, {"meta": {}})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        m.save(1, {"x": 1}, metadata={"bad": object()})
    assert not (tmp_path / "out").exists()
    check_weights_only_safe({"a": [1, 2.0, None, "s", (torch.zeros(1), torch.float16)]})


def test_rng_restore_reproduces_draws(tmp_path):
    def draws():
        return (random.random(), random.randint(0, 10**9), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(4).tolist(), torch.randn(2).tolist())

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    state = capture_rng_state()
    expected = draws()
    assert draws() != expected  # the generators moved on
    restore_rng_state(state)
    assert draws() == expected
    # and through a checkpoint file loaded with weights_only=True
    m = CheckpointManager(tmp_path)
    m.save(0, {"rng": state})
    draws()
    restore_rng_state(m.load()["rng"])
    assert draws() == expected


def test_non_main_process_writes_nothing(tmp_path):
    other = CheckpointManager(tmp_path / "out", is_main_process=False)
    assert other.save(1, _state(1.0)) is None
    assert not (tmp_path / "out").exists()


def _two_process_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        manager = CheckpointManager(out_dir, keep_last=1, is_main_process=rank == 0)
        for step in (1, 2):
            rng = [None] * world
            dist.all_gather_object(rng, capture_rng_state())  # collectives happen on every rank, before save
            dist.barrier()
            manager.save(step, {"lora": {"w": torch.full((2,), float(step))}, "rng": {"per_rank": rng}})
            dist.barrier()
            loaded = manager.load()  # every rank can read once the barrier has passed
            assert loaded["meta"]["step"] == step and len(loaded["rng"]["per_rank"]) == world
            assert torch.equal(loaded["lora"]["w"], torch.full((2,), float(step)))
    finally:
        dist.destroy_process_group()


def test_several_processes_save_without_deadlock(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_two_process_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")),
                             nprocs=2, join=False, start_method="spawn")
    for _ in range(120):
        if ctx.join(timeout=1):
            break
    else:  # pragma: no cover - only on a hang
        for p in ctx.processes:
            p.kill()
        pytest.fail("processes did not finish: deadlock?")
    assert _listing(tmp_path / "out") == ["checkpoint-2", "latest"]
