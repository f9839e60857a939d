"""A slow start-up said once: when Python writes no bytecode and torch has none compiled, every
process compiles torch again (README, "Elastic": a rejoin's start doubled so on a GPU host)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASK = "from macfleet.cluster.info import bytecode_note; print(bytecode_note({!r}))"


def _note(module: str, *flags: str, path: Path | None = None, **env: str) -> str:
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    run_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (path, ROOT) if p)
    run_env.update(env)
    out = subprocess.run([sys.executable, *flags, "-c", ASK.format(module)], capture_output=True, text=True,
                         env=run_env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_package_without_bytecode_is_named_with_what_to_do(tmp_path):
    pkg = tmp_path / "uncompiled"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    said = _note("uncompiled", "-B", path=tmp_path)
    assert "uncompiled has no compiled files" in said and "PYTHONPYCACHEPREFIX=/tmp/pycache" in said
    assert _note("uncompiled", path=tmp_path, PYTHONDONTWRITEBYTECODE="1").startswith("Python writes no bytecode")
    # A cache prefix, or bytecode writing on: no note.
    assert _note("uncompiled", "-B", path=tmp_path, PYTHONPYCACHEPREFIX=str(tmp_path / "cache")) == "None"
    assert _note("uncompiled", path=tmp_path) == "None"
    assert not (pkg / "__pycache__").exists()  # asking imported nothing
    # Once the package has its compiled file, -B alone is no longer a slow start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True, timeout=60)
    assert _note("uncompiled", "-B", path=tmp_path) == "None"


def test_torch_as_installed_here_has_bytecode_and_no_note():
    assert _note("torch", "-B") == "None"
    assert _note("no_such_package_here", "-B") == "None"
