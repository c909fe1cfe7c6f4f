"""`make setup`'s torch choice: the pinned CPU wheel by default, the user's build with TORCH=..., and a torch that is
already installed (a CUDA build, say) is kept. Checked on make's dry run, so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = "torch --index-url https://download.pytorch.org/whl/cu124"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(tmp_path: Path, *overrides: str) -> str:
    cmd = ["make", "-n", "-B", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'venv'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def torch_line(out: str) -> str:
    (line,) = [x for x in out.splitlines() if '-c "import torch"' in x]
    return line


def test_setup_installs_the_pinned_cpu_torch_by_default(tmp_path):
    line = torch_line(dry_run(tmp_path))
    assert line.endswith("install torch==2.13.0; }")


def test_torch_override_reaches_pip_verbatim_and_an_installed_torch_is_kept(tmp_path):
    out = dry_run(tmp_path, f"TORCH={CUDA}")
    line = torch_line(out)
    assert f"install {CUDA}; }}" in line
    assert line.startswith(f'{tmp_path / "venv"}/bin/python -c "import torch" 2>/dev/null ||')  # only when missing
    # psft-lite itself comes after torch, so its torch requirement is already met by the user's build
    assert out.index("import torch") < out.index("install -e '.[dev]'")
