"""The package's layering: pcgpt.model computes and imports nothing from the server."""

import pkgutil
import subprocess
import sys

import pcgpt.model


def test_model_package_imports_nothing_from_the_server():
    modules = [f"pcgpt.model.{m.name}" for m in pkgutil.iter_modules(pcgpt.model.__path__)]
    assert "pcgpt.model.gpt" in modules and "pcgpt.model.generate" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pcgpt.serve', 'pcgpt.cli', 'fastapi', 'uvicorn'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout
