"""The package as a user gets it: a wheel built from this repository, installed into a fresh
virtual environment outside the checkout, serves the shipped models from a directory that is
not the checkout (`pcgpt serve` with no --model, run from /tmp).

Offline: the wheel is built without build isolation (the project's setuptools), and the new
environment finds torch and the other dependencies through a .pth file naming this project
environment's site-packages: a plain path entry, appended after the new environment's own
site-packages, so `pcgpt` itself comes from the wheel (the project's editable-install hook, a
.pth of that site-packages, is not run from a path entry)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from serving import ROOT, SHIPPED, Server, check_serves_shipped_models, environment

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]


def build_wheel(out: Path) -> Path:
    """`pip wheel` of a copy of what the wheel is built from (the build writes build/ and
    *.egg-info beside its sources: the checkout stays as it is)."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "pcgpt", src / "pcgpt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "-w", str(out), str(src)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (wheel,) = out.glob("pcgpt-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("package")
    wheel = build_wheel(tmp / "dist")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "--quiet", str(wheel)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # as a user's shell would have it: nothing of this checkout or its environment in the way
    env = {"PYTHONPATH": None, "VIRTUAL_ENV": None, "PYTHONHOME": None,
           "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    return {"wheel": wheel, "venv": env_dir, "python": python, "site": site, "env": env, "cwd": tmp}


def test_the_wheel_holds_one_package_with_its_data(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert {n.split("/")[0] for n in names} == {"pcgpt", Path(installed["wheel"]).name.split("-py")[0] + ".dist-info"}
    for model in SHIPPED:
        assert f"pcgpt/checkpoints/{model}/config.json" in names and f"pcgpt/checkpoints/{model}/model.safetensors" in names
    assert {"pcgpt/model/assets/gpt2/encoder.json", "pcgpt/model/assets/gpt2/vocab.bpe"} <= set(names)
    assert not [n for n in names if n.endswith("train_state.pt") or "/tests/" in n or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pcgpt = pcgpt.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()


def test_the_installed_package_is_the_wheels(installed):
    code = ("import pcgpt, pcgpt.serve.server, torch; from pcgpt.serve.config import DEFAULT_MODELS; "
            "print(pcgpt.__file__); print(*DEFAULT_MODELS.values(), sep='\\n'); print(torch.__file__)")
    p = subprocess.run([installed["python"], "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=installed["cwd"], env=environment(installed["env"]))
    assert p.returncode == 0, p.stderr
    package, *checkpoints, torch_file = p.stdout.split()
    assert Path(package).is_relative_to(installed["site"]), package  # not this checkout's pcgpt
    assert [Path(c).name for c in checkpoints] == list(SHIPPED)
    for c in map(Path, checkpoints):
        assert c.is_relative_to(installed["site"]) and (c / "model.safetensors").is_file(), c
    assert Path(torch_file).is_relative_to(sysconfig.get_paths()["purelib"])  # the dependencies: through the .pth


def test_pcgpt_serve_from_tmp_serves_the_shipped_models(installed):
    workdir = installed["cwd"] / "elsewhere"
    workdir.mkdir()
    with Server(None, executable=installed["venv"] / "bin" / "pcgpt", cwd=workdir, env=installed["env"],
                log_path=installed["cwd"] / "serve.log") as server:
        check_serves_shipped_models(server.url)
        log = server.read_log()
    assert str(installed["site"] / "pcgpt" / "checkpoints") in log  # it says what it serves, from where
    assert str(ROOT) not in log
