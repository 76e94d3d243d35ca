"""The build that non-x86 platforms get (csrc/cpu/cpu_features.h): with CUMO_PORTABLE=1 the CPU
extension has no AVX-512 kernel, and the CPU backend still matches the reference. Slow (it builds
the extension again, about a minute): run with --runslow."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_portable_cpu_build_matches_reference(tmp_path):
    copy = tmp_path / "cumo"
    copy.mkdir()
    ignore = shutil.ignore_patterns("*.so", "build", "__pycache__", ".venv", "*.egg-info", "out", ".git")
    for name in ("setup.py", "pyproject.toml", "conftest.py", "csrc", "moe_kernels", "cumo_layers", "tests"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=ignore)
        else:
            shutil.copy2(source, copy / name)
    env = dict(os.environ, CUMO_PORTABLE="1", CUMO_SKIP_CUDA="1", MAX_JOBS="2", PYTHONPATH=str(copy))
    subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=copy, env=env,
                   check=True, capture_output=True)
    library = next((copy / "moe_kernels").glob("_C*.so"))
    symbols = subprocess.run(["nm", "-C", str(library)], capture_output=True, text=True, check=True).stdout
    assert "rows_times_weight" not in symbols and "combine_token_avx512" not in symbols
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             "tests/moe_kernels/test_cpu.py", "tests/moe_kernels/test_glu_variants.py",
                             "tests/moe_kernels/test_ops_properties.py", "-k", "not triton"],
                            cwd=copy, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
