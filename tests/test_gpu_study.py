"""scripts/gpu_study.sh: one clear line without CUDA; its scaled-up study config validates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_study.sh"


def _run(tmp_path, **env):
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_says_so_in_one_line(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 1
    assert res.stdout.splitlines() == ["gpu_study: no CUDA device on this machine (torch.cuda.is_available() is "
                                       "False): nothing was run"]
    assert not (tmp_path / "out").exists()


def test_the_scaled_up_study_config_validates(tmp_path):
    res = _run(tmp_path, CHECK_ONLY="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "gpu_study: config ok, 96 cells (3 seeds x 4 noise settings x 8 methods)"
