"""The installed console script works and `import cli` stays light (no torch), so `regtok --help` is instant."""

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
    code = ("import sys, cli; heavy = [m for m in ('torch', 'h5py', 'open_clip', 'timm', 'webdataset') "
            "if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"`import cli` imported {result.stdout.strip()}"


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "cli", "no-such-command"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
