"""scripts/setup_env.sh installs only when something it depends on changed (a stand-in python records each pip run),
and says what it is doing while it installs. The real second `scripts/demo.sh --prompt ...` is timed by .ci/run."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/usr/bin/env bash
# records what it is asked to run; every command succeeds ("import torch" and "import kogpt_fast" too)
printf '%s\\n' "$*" >> "{record}"
"""


def checkout(tmp_path: Path) -> Path:
    """The files setup_env.sh reads, and a .venv whose python is the stand-in."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", repo / "scripts")
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, repo)
    shutil.copytree(ROOT / "csrc", repo / "csrc")
    bin_ = repo / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(FAKE_PYTHON.format(record=tmp_path / "record"))
    (bin_ / "python").chmod(0o755)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return repo


def setup(repo: Path, extras: str = "", **env) -> tuple[list[str], str]:
    """Source setup_env.sh once: (the pip installs it ran, what it printed)."""
    record = repo.parent / "record"
    record.write_text("")
    result = subprocess.run(["bash", "-c", f'source scripts/setup_env.sh "{extras}" && echo sourced'], cwd=repo,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(repo.parent), **env})
    assert result.returncode == 0 and result.stdout.strip() == "sourced", result.stderr
    installs = [line for line in record.read_text().splitlines() if "pip install" in line]
    return installs, result.stderr


def test_setup_installs_only_what_changed(tmp_path):
    repo = checkout(tmp_path)
    installs, said = setup(repo, "test,bench")
    assert installs == ["-m pip install -q -e .[bench,test]"]
    assert "installing kogpt-fast (editable, with bench,test)" in said and "CUDA library" in said
    assert setup(repo, "test,bench") == ([], "")  # the second run: nothing installed, nothing said
    assert setup(repo, "") == ([], "")  # the demo's set-up after the tests' (fewer extras)
    assert setup(repo, "test") == ([], "")
    (repo / "csrc" / "gemv.cu").write_text((repo / "csrc" / "gemv.cu").read_text() + "\n// changed\n")
    installs, _ = setup(repo, "")
    assert installs == ["-m pip install -q -e .[bench,test]"]  # csrc changed: again, keeping the extras
    assert setup(repo, "") == ([], "")
    installs, said = setup(repo, "", KOGPT_BUILD_CUDA="1")  # asked for the CUDA library: a new install
    assert installs and "KOGPT_BUILD_CUDA=1" in said
    installs, _ = setup(repo, "test,docs")
    assert installs == ["-m pip install -q -e .[bench,docs,test]"]  # a new extra


def test_a_failed_install_is_tried_again(tmp_path):
    repo = checkout(tmp_path)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(python.read_text() + 'case "$*" in *"pip install"*) exit 1;; esac\n')
    result = subprocess.run(["bash", "-c", "source scripts/setup_env.sh ''"], cwd=repo, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode != 0 and not (repo / ".venv" / ".kogpt-fast-installed").exists()
