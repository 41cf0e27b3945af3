"""Every command in README.md's ```bash blocks runs, in order, through the installed `regtok` script.

`.ci/run` runs the two commands marked ``<!-- ci:install-and-run -->`` and ``<!-- ci:test -->``; this test runs
every other one, parsed from the README (never copied), in a workspace that holds tiny stand-ins for what the
README assumes: ``data/ssvtp/{train,test}.csv`` with PNG pairs and a TVL Stage-1 checkpoint at
``checkpoints/tvl_stage1.pth``. What cannot run here is replaced through the small, explicit tables below, and
the test asserts that every README command was either run or skipped with a stated reason, and that every
replacement was used (a replacement that no longer matches the README is a failure, not a silent no-op).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CI_MARKERS = ("<!-- ci:install-and-run -->", "<!-- ci:test -->")  # run by .ci/run, not here

# Commands of the Development block that this test does not run, with the reason.
SKIP = {
    "python -m pytest -q": "the suite itself (this test is part of it)",
    "ruff check .": "a linter, not a regtok command",
    "tensorboard --logdir sweeps/seed": "a web server that runs until stopped",
}

# README argument → what runs here. Pretrained weights cannot be downloaded and there is no GPU; a ViT-B/16
# at 224 px is slow on CPU, so the TVL checkpoint in the workspace holds a ViT-Ti/16 tactile encoder.
SPEC_MAP = {
    "open_clip:ViT-L-14@openai": "tiny:0",
    "tvl:vit_base_patch16_224@checkpoints/tvl_stage1.pth": "tvl:vit_tiny_patch16_224@checkpoints/tvl_stage1.pth",
}
# The README's TPE sweep runs 40 trials on real data; here 2 (one per --jobs worker) show the same path.
FLAG_MAP = {("--device", "cuda"): ("--device", "cpu"), ("--trials", "40"): ("--trials", "2")}
# The method's defaults train a 4-layer, 512-wide model for 20 epochs: ~50 s per run on one CPU core. The
# README's `regtok train` lines run with these flags appended (the tiny preset, 2 epochs; a sweep's trials 1
# epoch, as the seed table's space makes trials of up to 512 wide and 4 layers: ~25 s per epoch here); every flag
# and key=value override the README gives still applies, as they resolve after the preset.
APPEND = {"train": ["--preset", "tiny", "--epochs", "2"], "sweep": ["--preset", "tiny", "--epochs", "1"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun` with the same arguments, 2 CPU ranks
NPROC = re.compile(r"--nproc_per_node=\d+")
TVL_MODEL = "vit_tiny_patch16_224"


def readme_python(text: str) -> list[str]:
    """The code of every ```python block."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands(text: str) -> list[tuple[str, str, str]]:
    """``(section, marker, command)`` for every non-blank line of every ```bash block: the ``## `` heading above
    it, the HTML comment on the line before the block ('' when none). Trailing ``# comments`` are dropped."""
    commands, section, marker, previous, block = [], "", "", "", None
    for line in text.splitlines():
        if block is None and line.startswith("## "):
            section = line[3:].strip()
        if block is None and line.startswith("```bash"):
            block, marker = [], previous.strip() if previous.strip().startswith("<!--") else ""
        elif block is not None and line.startswith("```"):
            commands += [(section, marker, c) for c in block]
            block = None
        elif block is not None and line.strip():
            block.append(shlex.join(shlex.split(line, comments=True)))
        if line.strip():
            previous = line
    assert block is None, "README.md has an unclosed ```bash block"
    return commands


def translate(command: str, used: set) -> list[str]:
    """The argv this test runs for a README command (see SPEC_MAP, FLAG_MAP, TORCHRUN)."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        nproc = [a for a in argv if NPROC.fullmatch(a)]
        assert len(nproc) == 1, command
        argv = TORCHRUN + ["--nproc_per_node=2" if NPROC.fullmatch(a) else a for a in argv[1:]]
        used.add("torchrun")
    out: list[str] = []
    for arg in argv:
        key, sep, spec = arg.partition("=")
        if sep and spec in SPEC_MAP:
            arg = f"{key}={SPEC_MAP[spec]}"
            used.add(spec)
        if out and (out[-1], arg) in FLAG_MAP:
            used.add((out[-1], arg))
            out[-1], arg = FLAG_MAP[(out[-1], arg)]
        out.append(arg)
    sub = next((a for a in out if a in APPEND), None)
    if sub is not None and out[out.index(sub) - 1].endswith("regtok"):
        out += APPEND[sub]
        used.add(sub)
    return out


# ── the README's world, in miniature ────────────────────────────────────────────────────────────────


def _png(path: Path, rgb: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path.as_posix()


def write_ssvtp(root: Path, split: str, rows: int, seed: int) -> None:
    """``root/{split}.csv`` with TVL's ``url`` / ``tactile`` columns, a ``material`` class and a free-text
    ``caption``, and small paired PNGs under ``root/images``."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        base = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)  # shared content, seen by both images
        tactile = np.clip(base.astype(int) // 2 + rng.integers(0, 64, base.shape), 0, 255).astype(np.uint8)
        records.append({"url": f"images/{split}/{i:04d}/rgb.png", "tactile": f"images/{split}/{i:04d}/tac.png",
                        "material": ("wood", "metal", "fabric")[i % 3], "caption": f"a {('rough', 'smooth')[i % 2]} "
                        f"surface, sample {i}"})
        _png(root / records[-1]["url"], base)
        _png(root / records[-1]["tactile"], tactile)
    with open(root / f"{split}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "tactile", "material", "caption"])
        writer.writeheader()
        writer.writerows(records)


def write_tvl_checkpoint(path: Path) -> None:
    """A checkpoint in TVL Stage-1's layout: ``model`` with ``tactile_encoder.*`` keys, ``args``, ``epoch``."""
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tactile = timm.create_model(TVL_MODEL, pretrained=False, num_classes=32, global_pool="avg")
    model = {f"tactile_encoder.{k}": v for k, v in tactile.state_dict().items()}
    model["logit_scale"] = torch.tensor(2.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "epoch": 3, "args": argparse.Namespace(tactile_model=TVL_MODEL)}, path)


# ── tests ───────────────────────────────────────────────────────────────────────────────────────────


def test_ci_markers_each_mark_one_command():
    """.ci/run reads the first line after each marker; each marked block must hold exactly that one command."""
    commands = readme_commands(README.read_text())
    ci = (REPO / ".ci" / "run").read_text()
    for marker in CI_MARKERS:
        assert marker.removeprefix("<!-- ci:").removesuffix(" -->") in ci, marker
        assert len([c for _, m, c in commands if m == marker]) == 1, marker
    assert commands[0][1] == CI_MARKERS[0], "the README must start with the install-and-run command"
    assert "regtok demo" in commands[0][2]


def test_translation_tables_are_explicit():
    """The replacements do exactly what their comments say, on a synthetic line."""
    used: set = set()
    argv = translate("torchrun --standalone --nproc_per_node=8 --no-python regtok extract --encoder "
                     "vision=open_clip:ViT-L-14@openai --device cuda --batch-size 256", used)
    assert argv == [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python", "regtok", "extract",
                    "--encoder", "vision=tiny:0", "--device", "cpu", "--batch-size", "256"]
    assert translate("regtok train --out r --loss flow_matching", used)[-4:] == APPEND["train"]
    assert translate("regtok eval --run train", used)[-1] == "train"  # only the subcommand triggers
    assert used == {"torchrun", "open_clip:ViT-L-14@openai", ("--device", "cuda"), "train"}


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    commands = readme_commands(README.read_text())
    write_ssvtp(tmp_path / "data" / "ssvtp", "train", rows=24, seed=0)
    write_ssvtp(tmp_path / "data" / "ssvtp", "test", rows=16, seed=1)
    write_tvl_checkpoint(tmp_path / "checkpoints" / "tvl_stage1.pth")
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # the walkthrough runs beside a checkout's configs/
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REGTOK_NO_PROGRESS": "1", "REGTOK_CACHE_DIR": str(tmp_path)}
    used: set = set()
    ran, skipped = [], []
    for section, marker, command in commands:
        if marker in CI_MARKERS or command in SKIP:
            skipped.append(command)
            continue
        argv = translate(command, used)
        cwd = REPO if section == "Development" else tmp_path  # the Development block runs in a checkout
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (f"README command failed: {command}\nran: {shlex.join(argv)}\n"
                                        f"{result.stderr[-3000:]}")
        assert "Traceback" not in result.stderr, command
        ran.append((argv, result.stdout))
    assert len(ran) + len(skipped) == len(commands)
    assert set(SKIP) <= set(skipped), f"SKIP names commands the README no longer has: {set(SKIP) - set(skipped)}"
    everything = {"torchrun", *SPEC_MAP, *FLAG_MAP, *APPEND}
    assert used == everything, f"replacements the README no longer needs: {everything - used}"
    check_results(tmp_path, ran)
    check_python(tmp_path, env)


def check_python(ws: Path, env: dict[str, str]) -> None:
    """The README's Python blocks run in the walkthrough's workspace (``touch.png``: any tactile image)."""
    blocks = readme_python(README.read_text())
    assert blocks, "README.md has no ```python block"
    shutil.copy(next((ws / "data" / "ssvtp" / "images" / "test").glob("*/tac.png")), ws / "touch.png")
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], cwd=ws, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"README python block failed:\n{code}\n{result.stderr[-3000:]}"
        assert "Run('runs/contrastive'" in result.stdout and "FeatureStore(" in result.stdout, result.stdout
        assert re.search(r"R@1 \d+\.\d%; \d+ → \[", result.stdout), result.stdout


def check_results(ws: Path, ran: list[tuple[list[str], str]]) -> None:
    """What the README's walkthrough promises, on the files the commands wrote."""
    for argv, stdout in ran:
        sub = next((a for a in argv if a in ("pack", "extract", "train", "eval")), None)
        if sub is not None:  # the walkthrough's stages print the path of what they wrote (rank 0 only)
            lines = stdout.strip().splitlines()
            assert len(lines) == 1 and (ws / lines[0]).is_file(), (argv, stdout)
    labels = json.loads((ws / "shards/ssvtp-train/dataset.json").read_text())["labels"]
    assert labels == {"material": {"type": "categorical", "classes": ["fabric", "metal", "wood"]},
                      "caption": {"type": "text"}}  # the README's --label-col material --label-col caption:text
    for store in ("features/ssvtp-train", "features/ssvtp-test"):
        m = json.loads((ws / store / "manifest.json").read_text())
        assert m["encoders"]["tactile"]["spec"].startswith("tvl:") and m["encoders"]["tactile"]["epoch"] == 3
    assert json.loads((ws / "features/ssvtp-test/manifest.json").read_text())["timings"]["ranks"] == 2
    assert json.loads((ws / "runs/ddp/manifest.json").read_text())["world_size"] == 2
    for run in ("contrastive", "flow", "combined", "ddp"):
        assert (ws / "runs" / run / "checkpoint.safetensors").is_file()
    assert (ws / "reports/contrastive/embeddings.h5").is_file()
    flow = json.loads((ws / "reports/flow/report.json").read_text())
    assert "flow" in json.dumps(flow)
    by_command = {a[a.index("regtok") + 1] if "regtok" in a else a[-1]: out for a, out in ran}
    assert "ssvtp-train" in by_command["show"] and "dataset" in by_command["show"]  # the chain reaches the shards
    assert "changed" not in by_command["verify"] and "missing" not in by_command["verify"]
    assert (ws / "reruns/contrastive/checkpoint.safetensors").is_file()
    seed = json.loads((ws / "sweeps/seed/report.json").read_text())
    assert seed["sampler"] == "tpe" and len(seed["trials"]) >= 2 and (ws / "sweeps/seed/best.yaml").is_file()
    assert "model.n_shared" in by_command["compare"] and (ws / "reports/compare/curves.png").is_file()
