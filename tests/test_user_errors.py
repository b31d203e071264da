"""Errors a user can cause reach them as one ``error:`` line with exit status 2 and no traceback, through
``python -m rdt_lib.train`` (in-process ``main(argv)``) on the tiny_cpu preset; resume finds the last intact
checkpoint; a full disk loses nothing; files get the permissions of the user's umask."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

from rdt_lib import atomic_io
from rdt_lib.errors import DiskFullError, UserError, run_cli
from rdt_lib.train.checkpoint import CheckpointManager, estimate_checkpoint_bytes
from rdt_lib.train.cli import main
from train_fixtures import tiny_overrides


def _cli(out: Path, capsys, *sets: str, extra_args=(), **overrides) -> tuple[int, str]:
    argv = ["--config", "tiny_cpu", *extra_args]
    for item in tiny_overrides(out, **overrides) + list(sets):
        argv += ["--set", item]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _one_error(text: str) -> str:
    """The single ``error:`` line of ``text`` (asserting there is exactly one and no traceback)."""
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    return lines[0]


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (checkpoints 1 and 2, a validation grid) written under umask 022, and an uninterrupted
    3-step reference run."""
    root = tmp_path_factory.mktemp("trained")
    old_mask = os.umask(0o022)
    try:
        argv = ["--config", "tiny_cpu"]
        for item in tiny_overrides(root / "run", **{"checkpoint.keep_last": 3, "validation.every": 2}):
            argv += ["--set", item]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(argv) == 0
            ref = ["--config", "tiny_cpu"]
            for item in tiny_overrides(root / "ref", **{"run.max_steps": 3}):
                ref += ["--set", item]
            assert main(ref) == 0
    finally:
        os.umask(old_mask)
    return root


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained / "run", out)
    for name in ("lora.safetensors", "lora.toml"):
        (out / name).unlink()
    return out


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------------------------
# corrupt checkpoints and resume


def test_named_truncated_checkpoint_is_refused_with_the_intact_ones(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    _truncate(out / "checkpoint-2" / "optimizer.pt")
    code, text = _cli(out, capsys, f'run.resume="{out / "checkpoint-2"}"', **{"run.max_steps": 3})
    assert code == 2
    line = _one_error(text)
    assert "checkpoint-2" in line and "optimizer.pt is truncated" in line and "bytes" in line
    assert "intact checkpoints: checkpoint-1" in line
    assert "allow_pickle" not in line  # only for a pickle that needs code
    assert not (out / "checkpoint-3").exists()


def test_resume_latest_skips_a_corrupt_newest_checkpoint_and_stays_bit_exact(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    _truncate(out / "checkpoint-2" / "lora.safetensors", 0.9)
    code, text = _cli(out, capsys, 'run.resume="latest"', **{"run.max_steps": 3})
    assert code == 0, text
    assert "skipped checkpoint-2: lora.safetensors is truncated" in text
    assert "resumed from" in text and "checkpoint-1 at step 1" in text
    # resumed from step 1 = the uninterrupted 3-step run, bit for bit; and both differ from the step-2 weights
    resumed, reference = _lora(out / "lora.safetensors"), _lora(trained / "ref" / "lora.safetensors")
    step2 = _lora(trained / "run" / "lora.safetensors")
    assert resumed.keys() == reference.keys()
    assert max(float((reference[k] - step2[k]).abs().max()) for k in reference) > 1e-6
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_resume_latest_with_no_intact_checkpoint_names_each_problem(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    _truncate(out / "checkpoint-1" / "trainer.pt")
    (out / "checkpoint-2" / "meta.json").write_text('{"format": 1, "step"')  # torn meta.json
    code, text = _cli(out, capsys, 'run.resume="latest"', **{"run.max_steps": 3})
    assert code == 2
    line = _one_error(text)
    assert "no intact checkpoint" in line
    assert "checkpoint-1: trainer.pt is truncated" in line
    assert "checkpoint-2: meta.json is truncated or corrupt" in line


class _NeedsCode:  # a class torch.load(weights_only=True) refuses to construct
    pass


def test_refused_pickle_payload_gets_the_allow_pickle_hint(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    buffer = io.BytesIO()
    torch.save({"step": 2, "payload": _NeedsCode()}, buffer)
    (out / "checkpoint-2" / "trainer.pt").write_bytes(buffer.getvalue())
    code, text = _cli(out, capsys, f'run.resume="{out / "checkpoint-2"}"', **{"run.max_steps": 3})
    assert code == 2
    line = _one_error(text)
    assert "trainer.pt holds a pickled object that needs code to load" in line and "_NeedsCode" in line
    assert "allow_pickle=True" in line and "truncated" not in line


def test_checkpoint_with_another_lora_rank_is_refused(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    code, text = _cli(out, capsys, 'run.resume="latest"', **{"run.max_steps": 3, "lora.rank": 4})
    assert code == 2
    line = _one_error(text)
    assert "LoRA of rank 2" in line and "asks for rank 4" in line and "lora.rank" in line


def test_checkpoint_with_other_lora_targets_is_refused(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    code, text = _cli(out, capsys, 'run.resume="latest"', 'lora.target_modules=["to_q", "to_v"]',
                      **{"run.max_steps": 3})
    assert code == 2
    line = _one_error(text)
    assert "to_k, to_out.0, to_q, to_v" in line and "asks for rank 2 on to_q, to_v" in line


# ------------------------------------------------------------------------------------------------------------
# full disk


def _fill_disk_after(monkeypatch, limit: int) -> dict:
    """Make every rdt write fail with ENOSPC once ``limit`` bytes in total have been written."""
    written = {"bytes": 0}
    real = atomic_io._write_all

    def writer(fh, data):
        room = limit - written["bytes"]
        if len(data) > room:
            real(fh, data[:max(0, room)])
            written["bytes"] = limit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)
        written["bytes"] += len(data)

    monkeypatch.setattr(atomic_io, "_write_all", writer)
    return written


def test_full_disk_during_a_checkpoint_save_keeps_the_earlier_one(trained, tmp_path, capsys, monkeypatch):
    first = trained / "run" / "checkpoint-1"
    one_checkpoint = sum(f.stat().st_size for f in first.iterdir()) + len("checkpoint-1\n")
    # the disk fills 4000 bytes into the second checkpoint (its first file, lora.safetensors, is ~28 kB)
    _fill_disk_after(monkeypatch, one_checkpoint + 4000)
    out = tmp_path / "out"
    code, text = _cli(out, capsys, **{"run.max_steps": 3})
    monkeypatch.undo()
    assert code == 2
    line = _one_error(text)
    assert "No space left on device saving checkpoint-2" in line and "needed" in line and "free" in line
    assert "earlier checkpoints are intact (latest: checkpoint-1)" in line
    assert sorted(os.listdir(out)) == ["checkpoint-1", "latest"]  # no temporaries left behind
    state = CheckpointManager(out).load()
    assert state["meta"]["step"] == 1
    code, text = _cli(out, capsys, 'run.resume="latest"', **{"run.max_steps": 3})
    assert code == 0 and "checkpoint-1 at step 1" in text, text
    reference = _lora(trained / "ref" / "lora.safetensors")
    resumed = _lora(out / "lora.safetensors")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_full_disk_in_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old contents")
    _fill_disk_after(monkeypatch, 10)
    with pytest.raises(DiskFullError) as info:
        atomic_io.write_bytes_atomic(target, b"x" * 5000)
    assert info.value.errno == errno.ENOSPC and info.value.needed == 5000
    assert "4.9 KiB needed" in str(info.value) and "previous lora.safetensors is unchanged" in str(info.value)
    assert target.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["lora.safetensors"]


# ------------------------------------------------------------------------------------------------------------
# pre-flight checks


def test_too_little_room_is_reported_before_the_first_step(tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage

    def tiny_disk(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 50_000, 50_000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    out = tmp_path / "out"
    code, text = _cli(out, capsys)
    assert code == 2
    line = _one_error(text)
    assert f"not enough space in output directory {out}" in line
    assert "48.8 KiB free" in line and "needed for one checkpoint of 4,992 LoRA parameters" in line
    assert "checkpoint saved" not in text and os.listdir(out) == []


def test_estimate_covers_a_real_checkpoint_and_lora(trained):
    run = trained / "run"
    actual = sum(f.stat().st_size for f in (run / "checkpoint-1").iterdir()) + (run / "lora.safetensors").stat().st_size
    n_tensors = len(_lora(run / "lora.safetensors")) // 3 * 2  # kohya: down, up, alpha per module
    estimate = estimate_checkpoint_bytes(4992, n_tensors)
    assert actual <= estimate <= 4 * actual


def test_output_dir_that_is_a_file_is_an_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, text = _cli(blocker / "out", capsys)
    assert code == 2
    line = _one_error(text)
    assert f"output directory {blocker / 'out'} cannot be created" in line


# ------------------------------------------------------------------------------------------------------------
# inputs


def test_misspelled_preset_lists_the_presets(capsys):
    code = main(["--config", "tiny_gpu"])
    err = capsys.readouterr().err
    assert code == 2
    line = _one_error(err)
    assert "'tiny_gpu' is neither a config file nor a preset" in line and "tiny_cpu" in line
    assert "did you mean 'tiny_cpu'" in line and "draftplus_sd15_pickscore" in line


def test_missing_reward_weights_is_one_line(tmp_path, capsys):
    code, text = _cli(tmp_path / "out", capsys, f'rewards.0.path="{tmp_path / "no-weights"}"')
    assert code == 2
    line = _one_error(text)
    assert str(tmp_path / "no-weights") in line and "does not exist" in line and "aesthetic" in line


def test_unreachable_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    code, text = _cli(tmp_path / "out", capsys, **{"model.path": "someorg/no-such-model"})
    assert code == 2
    line = _one_error(text)
    assert "'someorg/no-such-model'" in line and "hub cannot be reached" in line and "local diffusers" in line


# ------------------------------------------------------------------------------------------------------------
# permissions


def test_written_files_follow_the_umask(trained, tmp_path):
    run = trained / "run"  # written under umask 022
    for name in ("lora.safetensors", "lora.toml", "latest", "validation/step-000002.png",
                 "checkpoint-2/meta.json", "checkpoint-2/optimizer.pt", "checkpoint-2/lora.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    old = os.umask(0o027)
    try:
        new = atomic_io.write_text_atomic(tmp_path / "new.toml", "a = 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
    os.chmod(new, 0o604)  # replacing a file keeps its permissions, as an ordinary write does
    atomic_io.write_text_atomic(new, "a = 2\n")
    assert stat.S_IMODE(new.stat().st_mode) == 0o604 and new.read_text() == "a = 2\n"


# ------------------------------------------------------------------------------------------------------------
# the wrapper


class _Oops(UserError):
    pass


def test_run_cli_hides_tracebacks_of_user_errors_unless_debugging(capsys, monkeypatch):
    def fails(argv):
        raise _Oops("the thing is wrong; give another thing")

    monkeypatch.delenv("RDT_DEBUG", raising=False)
    assert run_cli(fails, []) == 2
    assert capsys.readouterr().err == "error: the thing is wrong; give another thing\n"
    assert run_cli(fails, ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: the thing is wrong; give another thing\n")
    monkeypatch.setenv("RDT_DEBUG", "1")
    assert run_cli(fails, []) == 2 and "Traceback" in capsys.readouterr().err


def test_run_cli_lets_bugs_through(monkeypatch):
    monkeypatch.delenv("RDT_DEBUG", raising=False)

    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_cli(bug, [])
    with pytest.raises(OSError):  # an OSError with an errno that is not about the user's files
        run_cli(lambda argv: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")), [])


def test_resume_from_an_output_directory_names_its_checkpoints(trained, tmp_path):
    out = _copy_run(trained, tmp_path)
    from rdt_lib.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"is an output directory, not a checkpoint; name one of its "
                                              r"checkpoints \(checkpoint-1, checkpoint-2\)"):
        CheckpointManager(tmp_path / "elsewhere").load_for_resume(out)
    state, path = CheckpointManager(out).load_for_resume(out / "checkpoint-1")
    assert path == out / "checkpoint-1" and state["meta"]["step"] == 1


def test_run_cli_shows_os_errors_about_the_users_files_as_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RDT_DEBUG", raising=False)

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/logs/events.out")

    assert run_cli(full, []) == 2
    assert capsys.readouterr().err == ("error: No space left on device: /data/logs/events.out; free some space "
                                       "(files written before are intact)\n")


def test_unreadable_single_file_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 100)  # e.g. a download that stopped early
    code, text = _cli(tmp_path / "out", capsys, **{"model.path": str(bad)})
    assert code == 2
    line = _one_error(text)
    assert f"'{bad}' is not a readable .safetensors file" in line
