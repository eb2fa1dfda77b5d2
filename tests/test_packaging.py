"""A non-editable install works: the wheel carries recipes/ and slurm/ (issue 15: `pip install .` once
shipped neither, so `pretrain tiny-cpu-stag` said the recipe was not found). Built from a copy of the
source, installed into a fresh environment whose only other path is this one's dependencies, and run
from outside the checkout."""

import importlib.metadata
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _installed_here():
    """This environment's own megatron-stag installations (site-packages only: the checkout's egg-info
    on sys.path would answer for them): what the test must not touch."""
    return sorted((d.version, sorted(str(f) for f in d.files or []))
                  for d in importlib.metadata.distributions(path=site.getsitepackages())
                  if d.metadata["Name"] == "megatron-stag")


def test_installed_wheel_finds_its_recipes_and_batch_scripts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in ("setup.py", "README.md"):
        shutil.copyfile(REPO / item, src / item)
    for item in ("megatron_stag", "recipes", "slurm"):
        shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
    run = dict(capture_output=True, text=True, timeout=600)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], **run)
    assert built.returncode == 0, built.stderr[-2000:]
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, **run)
    before = _installed_here()
    # --ignore-installed: with --prefix alone pip first uninstalls the running environment's own
    # megatron-stag (the editable install `make` made), and `make quickstart` after `make test` failed
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                                "--prefix", str(env), *map(str, (tmp_path / "dist").glob("*.whl"))], **run)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert _installed_here() == before, "installing into the new environment changed this one's megatron-stag"
    env_site = next(env.glob("lib/python3*/site-packages"))
    (env_site / "deps.pth").write_text(site.getsitepackages()[0] + "\n")  # dependencies, not the checkout
    python = str(env / "bin" / "python")

    def cli(*args):
        return subprocess.run([python, "-m", "megatron_stag.cli", *args], cwd=tmp_path, **run)

    where = subprocess.run([python, "-c", "import megatron_stag; print(megatron_stag.__file__)"], cwd=tmp_path, **run)
    assert where.stdout.startswith(str(env)), where.stdout + where.stderr
    helped = cli("pretrain", "--help")
    assert helped.returncode == 0 and "tiny-cpu-stag" in helped.stdout, helped.stderr[-2000:]
    assert "(default: 64)" in cli("generate", "--help").stdout
    job = cli("submit", "--dry-run", "--cpu", "--run-dir", str(tmp_path / "run"), "tiny-cpu-stag")
    assert job.returncode == 0, job.stderr[-2000:]
    assert f"{env}/share/megatron-stag/slurm/pretrain.sbatch" in job.stdout
