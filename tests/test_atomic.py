"""Atomic writes: the file appears whole or not at all, with the permissions a plain open() gives."""

import os
import stat

import pytest

from lorakit.atomic import atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_has_default_permissions_and_leaves_nothing_on_error(tmp_path, umask_022):
    dest = tmp_path / "out.txt"
    with atomic_file(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and stat.S_IMODE(dest.stat().st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert dest.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    os.umask(0o077)  # a private umask stays private
    with atomic_file(tmp_path / "private.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_a_run_folder_is_readable_by_others(tiny_model_dir, tmp_path, umask_022):
    from test_train import _cfg, _data

    from lorakit.training.loop import train

    train(_cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", max_steps=2, save_every=1),
          show_progress=False, echo=lambda s: None)
    run = tmp_path / "run"
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")}
    assert modes["adapter/adapter_model.safetensors"] == 0o644 and modes["loss.png"] == 0o644
    assert modes["checkpoints/step-00000001"] == 0o755
    assert {m for m in modes.values()} <= {0o644, 0o755}, modes
