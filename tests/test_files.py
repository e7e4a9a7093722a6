"""gradcomp.files: atomic writes that leave the umask's permissions, and the result files that use them."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from gradcomp.files import atomic_write, atomic_write_text, current_umask, default_file_mode


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(umask022):
    assert current_umask() == 0o022 and default_file_mode() == 0o644
    os.umask(0o027)
    assert current_umask() == 0o027 and default_file_mode() == 0o640
    assert os.umask(0o022) == 0o027  # still what was set


def test_atomic_write_gives_the_mode_open_would_give(tmp_path, umask022):
    atomic_write_text(tmp_path / "a" / "summary.json", "{}")
    with open(tmp_path / "plain.json", "w") as fh:
        fh.write("{}")
    assert _mode(tmp_path / "a" / "summary.json") == _mode(tmp_path / "plain.json") == 0o644
    # a writer that creates its own file with 0600 (mkstemp, safetensors) ends with the umask's mode too
    def private_writer(tmp: str) -> None:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)

    atomic_write(tmp_path / "w.bin", private_writer)
    assert _mode(tmp_path / "w.bin") == 0o644 and (tmp_path / "w.bin").read_bytes() == b"x"
    atomic_write(tmp_path / "t.pt", lambda tmp: torch.save({"x": torch.ones(2)}, tmp))
    assert _mode(tmp_path / "t.pt") == 0o644 and torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.ones(2))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "r.json", "old")

    def fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "r.json", fail)
    assert (tmp_path / "r.json").read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_save_quantized_file_gets_the_umask_mode(tmp_path, umask022):
    from gradcomp import WeightQuantConfig, quantize_, save_quantized

    model = quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), WeightQuantConfig(bits=8))
    save_quantized(model, tmp_path / "q.safetensors")
    assert _mode(tmp_path / "q.safetensors") == 0o644
