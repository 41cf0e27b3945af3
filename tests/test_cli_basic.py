"""The installed console script works and `import regtok.cli` stays light (no torch), so `regtok --help` is instant."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def test_console_script_lists_the_data_commands():
    exe = shutil.which("regtok")
    if exe is None:
        pytest.fail("the `regtok` console script is not installed (pip install -e '.[test]')")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "synth" in result.stdout and "pack" in result.stdout
    for command in ("synth", "pack"):
        sub = subprocess.run([exe, command, "--help"], capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0 and "Usage: regtok " + command in sub.stdout


def test_importing_cli_does_not_import_heavy_modules():
    code = ("import sys, regtok.cli; heavy = [m for m in ('torch', 'h5py', 'open_clip', 'timm', 'webdataset') "
            "if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"`import regtok.cli` imported {result.stdout.strip()}"


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "regtok", "no-such-command"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2


def test_the_install_adds_only_regtok_to_site_packages(tmp_path):
    """cli/ and pipeline/ install as regtok.cli and regtok.pipeline: no generic top-level `cli` or `pipeline`."""
    import shutil as sh
    import zipfile
    from pathlib import Path

    repo, src = Path(__file__).resolve().parent.parent, tmp_path / "src"
    keep = ("cli", "pipeline", "regtok")  # a copy, so the build leaves no build/ or egg-info in the checkout
    sh.copytree(repo, src, ignore=lambda d, names: [n for n in names if Path(d) == repo and n not in keep
                                                   and n not in ("pyproject.toml", "README.md")])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("regtok-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"regtok", wheel.name.split("-py")[0] + ".dist-info"}
    folders = [p.name for p in (repo / "pipeline").iterdir() if (p / "__init__.py").is_file()]
    assert {"regtok/cli/__init__.py", "regtok/pipeline/extract/store.py", "regtok/model.py",
            *(f"regtok/pipeline/{f}/__init__.py" for f in folders)} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "regtok = regtok.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
