"""Small Stage-1 encoders for the learning-quality testbed: one timm model per modality, trained on a synth split.

    python benchmarks/stage1.py --work DIR [--samples 3000] [--epochs 8] [--model test_vit]

Random-init encoders give features whose cross-modal structure is linear (DESIGN.md, "Baselines and
generalisation"), so they cannot tell one Stage-2 method from another; real Stage-1 encoders are trained. This
script trains, per modality, a timm ``--model`` (default ``test_vit``: 0.37 M parameters, 160 px input) from
scratch, supervised on the generator's factors the modality sees: the material class (cross-entropy) and every
continuous factor of the shared group and of its own group (squared error on standardised targets). The
training split is ``regtok synth``'s generator at seed 7 on every material family, disjoint from the benchmark's
splits (seeds 41, 42, 43): like a real Stage-1 encoder, trained on broad data, it has seen every kind of surface;
the Stage-2 training split is what lacks the unseen families.

It writes ``DIR/stage1-vision.safetensors`` and ``DIR/stage1-tactile.safetensors`` (the backbone's state dict,
no head) that ``regtok extract --encoder vision=timm:test_vit@DIR/stage1-vision.safetensors`` loads, and
``DIR/stage1.json`` with what was trained, the held-out accuracy and R² per factor, and the time (at most
10 minutes on 2 CPU cores at the defaults). A finished ``DIR`` is reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SEED = 7  # the benchmark's splits use 41, 42 and 43


def render(samples: int, seed: int, size: int = 64) -> tuple[dict, dict]:
    """{modality: [PNG bytes]} and {factor: (N,) array} of ``samples`` synth pairs, as ``regtok synth`` writes them."""
    import numpy as np

    from regtok.pipeline.data import synth

    families = synth.check_families(None)  # every family
    images: dict[str, list] = {"vision": [], "tactile": []}
    factors: dict[str, list] = {}
    for i in range(samples):
        rng = synth.sample_rng(seed, i)
        f = synth.draw_factors(rng, families)
        vision, tactile = synth.render_pair(f, size, rng)
        images["vision"].append(synth.encode_png(vision))
        images["tactile"].append(synth.encode_png(tactile))
        for name, value in f.items():
            if name != "material_name":
                factors.setdefault(name, []).append(value)
    return images, {k: np.asarray(v, dtype=np.float64) for k, v in factors.items()}


def targets_for(modality: str, factors: dict) -> list[str]:
    """The continuous factors a modality sees: the shared group's and its own (cos/sin for the angles)."""
    from regtok.pipeline.data import synth

    names = []
    for name, spec in synth.declared_labels().items():
        if name == "material" or name in synth.CIRCULAR or spec.get("group") not in ("shared", modality):
            continue
        names.append(name)
    return [n for n in names if n in factors]


def train_encoder(model_name: str, modality: str, images: list, factors: dict, epochs: int, seed: int,
                  log) -> tuple[dict, dict]:
    """Train one backbone on ``images`` (90 %) and score it on the rest; (state dict, held-out scores)."""
    import numpy as np
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from regtok.pipeline.data import synth
    from regtok.pipeline.encoders.images import prep_from_transform

    torch.manual_seed(seed)
    backbone = timm.create_model(model_name, pretrained=False, num_classes=0)
    prep = prep_from_transform(create_transform(**resolve_data_config({}, model=backbone), is_training=False))
    x = torch.stack([prep.to_uint8(png) for png in images])  # (N, 3, H, W) uint8, as extract decodes them
    names = targets_for(modality, factors)
    y = np.stack([factors[n] for n in names], 1)
    y = torch.from_numpy((y - y.mean(0)) / y.std(0)).float()  # (N, F) standardised
    cls = torch.from_numpy(factors["material"]).long()
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, fit = perm[: n // 10], perm[n // 10:]
    n_cls = len(synth.declared_labels()["material"]["classes"])
    head = torch.nn.Linear(backbone.num_features, n_cls + y.shape[1])
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(fit) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        backbone.train()
        order = fit[torch.randperm(len(fit), generator=g)]
        total = 0.0
        for i in range(len(fit) // 64):
            idx = order[i * 64:(i + 1) * 64]
            out = head(backbone(prep.normalize(x[idx])))
            loss = torch.nn.functional.cross_entropy(out[:, :n_cls], cls[idx]) + (out[:, n_cls:] - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log(f"{modality} epoch {epoch + 1}/{epochs}: loss {total / (len(fit) // 64):.3f}")
    backbone.eval()
    with torch.no_grad():
        out = torch.cat([head(backbone(prep.normalize(x[val[i:i + 256]]))) for i in range(0, len(val), 256)])
    acc = float((out[:, :n_cls].argmax(1) == cls[val]).float().mean())
    r2 = 1 - (out[:, n_cls:] - y[val]).pow(2).mean(0) / y[val].var(0, unbiased=False)
    return backbone.state_dict(), {"material_accuracy": acc, "r2": dict(zip(names, map(float, r2), strict=True))}


def train_stage1(work: Path, samples: int = 3000, epochs: int = 8, model: str = "test_vit", seed: int = 0,
                 log=print) -> dict:
    """Train (or reuse, when ``work`` holds the same) both encoders; the record written to work/stage1.json."""
    import time

    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "stage1.json"
    want = {"model": model, "samples": samples, "epochs": epochs, "seed": seed, "synth_seed": SEED,
            "families": "all"}
    if record_path.is_file() and json.loads(record_path.read_text()).get("config") == want:
        log(f"stage 1: reusing {record_path}")
        return json.loads(record_path.read_text())
    t0 = time.perf_counter()
    log(f"stage 1: rendering {samples} synth pairs (seed {SEED}, every material family)")
    images, factors = render(samples, SEED)
    record: dict = {"config": want, "encoders": {}}
    for i, modality in enumerate(("vision", "tactile")):
        sd, scores = train_encoder(model, modality, images[modality], factors, epochs, seed + i, log)
        path = work / f"stage1-{modality}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        record["encoders"][modality] = {"spec": f"timm:{model}@{path.resolve()}", **scores}
        log(f"stage 1: {modality}: held-out material accuracy {scores['material_accuracy']:.3f}; R² "
            + ", ".join(f"{k} {v:.2f}" for k, v in scores["r2"].items()))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record_path.write_text(json.dumps(record, indent=1))
    log(f"stage 1: written {record_path} ({record['seconds']:.0f} s in all)")
    return record


def ensure(work: Path, log=print) -> dict[str, str]:
    """The trained encoders' specs {modality: "timm:MODEL@FILE"}, training them at the defaults when needed."""
    return {m: e["spec"] for m, e in train_stage1(work, log=log)["encoders"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="Where the weights and stage1.json go.")
    p.add_argument("--samples", type=int, default=3000, help="Training pairs (10 %% of them held out).")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--model", default="test_vit", help="A timm architecture.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    train_stage1(args.work, args.samples, args.epochs, args.model, args.seed,
                 log=lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True))


if __name__ == "__main__":
    main()
