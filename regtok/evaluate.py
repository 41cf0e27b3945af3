"""Stage 3, the library half: retrieval per prefix, flow transport, what each part holds and reconstruction → a
report dict.

``evaluate`` reads features batch by batch (any array-like that slices, e.g. an HDF5 dataset) and encodes each batch
once: the registers are causal, so the first k registers are the k-register encoding, and the heads (shared
embedding, decoder) run on them for every prefix length k. It keeps only what the metrics need: the shared
embeddings of the retrieval prefixes, and for the probe rows (a seeded subset) the concatenated registers and the
read code. Probes and the reconstruction's ridge reference are fitted on ``fit`` (the run's training rows) and
scored here (:mod:`regtok.parts`); without ``fit``, on a held-out part of the evaluated split. With ``fit`` and
``cfg.baselines``, the same passes keep the read code of every evaluated row and of a seeded subset of the training
rows (``baseline_max_rows``), on which the linear baselines (:mod:`regtok.baselines`) are fitted: the input the model
reads, so the training rows are read and reduced once. No files, no printing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from regtok.config import EvalConfig  # noqa: F401 (its home is regtok.config; imported from here too)
from regtok.distributed import resolve_device
from regtok.errors import RegtokError
from regtok.parts import GROUPS, cosine, label_targets, part_summary, probe_plan, probe_rows  # noqa: F401
from regtok.probes import RidgeMap, split_indices
from regtok.retrieval import RECALL_KS, chance_metrics, l2_normalize, paired_ranks, rank_metrics, retrieval_metrics

TIE_RULE = "pessimistic: rank = 1 + #{j != i : s_ij >= s_ii} (a tie counts against the query)"
EmbeddingSink = Callable[[str, int, np.ndarray], None]  # (modality, k, (N, E) float32) in sample order
Log = Callable[[str], None]


@dataclass
class FitRows:
    """The rows probes and reconstruction references are fitted on: the run's training rows, as array-likes."""

    features: Mapping[str, Any]  # modality → (N, D) or (N, T, D)
    labels: Mapping[str, np.ndarray]  # name → (N,)
    source: str = "the run's training rows"


def prefix_plan(cfg: EvalConfig, n_registers: int, n_shared: int) -> tuple[list[int], list[int]]:
    """(probe prefixes, retrieval prefixes): the configured ks <= n_registers, and those <= n_shared.

    When no configured k is <= n_shared, retrieval uses k = n_shared (the whole shared embedding).
    """
    ks = sorted({k for k in cfg.prefixes if k <= n_registers})
    if not ks:
        raise RegtokError(f"no prefix in {list(cfg.prefixes)} is <= n_registers ({n_registers})")
    return ks, [k for k in ks if k <= n_shared] or [n_shared]


def evaluate(model: Any, features: Mapping[str, Any], labels: Mapping[str, np.ndarray],
             label_schema: Mapping[str, Mapping[str, Any]], cfg: EvalConfig, *, fit: FitRows | None = None,
             pooled: Mapping[str, Any] | None = None, embeddings_sink: EmbeddingSink | None = None,
             log: Log | None = None) -> dict[str, Any]:
    """Evaluate a RegTok on one split. features: {modality: (N, D) or (N, T, D) array-like}, the model's inputs.

    fit: the rows probes, reconstruction references and (``cfg.baselines``, a model with a read) the linear
    baselines are fitted on (None: a part of this split, and no linear baselines).
    pooled: the raw pooled features for the cosine baseline (default: ``features`` when they are pooled).
    labels: {name: (N,)}; label_schema: {name: {"type": "categorical" | "continuous", "group": …}} (store manifest).
    Returns the report dict (see pipeline/eval/report.py for the files written from it).
    """
    log = log or (lambda _msg: None)
    a, b = model.modalities
    n = _check_lengths(features, labels, (a, b))
    mcfg = model.cfg
    probe_ks, retr_ks = prefix_plan(cfg, mcfg.n_registers, mcfg.n_shared)
    device = resolve_device(cfg.device)
    rows = subset(n, cfg.probe_max_samples, cfg.seed)
    linear = cfg.baselines and fit is not None and all(e.read_width for e in model.encoders.values())
    enc = _encode(model, features, (a, b), probe_ks, retr_ks, rows, cfg, device, log,
                  code_rows=torch.arange(n) if linear else None)
    fitted = None
    if fit is not None:  # one pass over the training rows: the probes' registers and the baselines' read codes
        n_fit = len(fit.features[a])
        fit_rows = subset(n_fit, cfg.probe_max_samples, cfg.seed)
        fitted = fit_rows, _encode(model, fit.features, (a, b), [], [], fit_rows, cfg, device, log,
                                   code_rows=subset(n_fit, cfg.baseline_max_rows, cfg.seed) if linear else None)
    report: dict[str, Any] = {"n": n, "modalities": [a, b], "retrieval": [], "tie_rule": TIE_RULE,
                              "prefixes": {"retrieval": retr_ks, "probes": probe_ks, "n_shared": mcfg.n_shared}}
    for k in retr_ks:
        log(f"retrieval k={k}")
        report["retrieval"].append({"k": k, **retrieval_metrics(enc.shared[a][k], enc.shared[b][k], cfg.chunk_size,
                                                                device)})
        if embeddings_sink is not None:
            for m in (a, b):
                embeddings_sink(m, k, enc.shared[m][k].numpy())
    report["baselines"] = _baselines(n, pooled if pooled is not None else features, (a, b), cfg, device)
    report["flow"] = _flow(model, enc.shared, (a, b), retr_ks, cfg, device, log)
    report.update(_parts(model, features, labels, label_schema, cfg, fit, fitted, rows, enc, probe_ks, device, log))
    if linear:
        report["baselines"]["linear"] = _linear_baselines(model, fitted[1].read, enc.read, cfg, device, log)
    return report


def _linear_baselines(model: Any, train: dict[str, Tensor], test: dict[str, Tensor], cfg: EvalConfig,
                      device: torch.device, log: Log) -> dict[str, Any]:
    """The baselines of :mod:`regtok.baselines`, fitted on the training rows' read codes and scored on the
    evaluated rows': the input the model reads, the run's own PCA of its training rows (no second reduction)."""
    from regtok.baselines import BaselineConfig, fit_and_score

    out = fit_and_score(train, test, tuple(model.modalities), BaselineConfig(embed_dim=model.cfg.embed_dim,
                                                                               seed=cfg.seed),
                        cfg.chunk_size, device, log, reduced=True)
    for row in out.values():
        row["fit"]["input"] = "the model's read, the PCA of its training rows it was trained with"
    return out


@dataclass
class _Encoded:
    shared: dict[str, dict[int, Tensor]]  # modality → k → (N, E) float32, retrieval prefixes only
    registers: dict[str, Tensor]  # modality → (P, R·d) float16, every register of the probe rows, concatenated
    codes: dict[str, Tensor]  # modality → (P, K) float32, the read code (the decoder's target space) of those rows
    recon: dict[str, dict[int, Tensor]]  # modality → k → (P,) the decoder's reconstruction cosine per probe row
    read: dict[str, Tensor] | None = None  # modality → (C, K) float32, the read code of the ``code_rows`` (baselines)


@torch.no_grad()
def _encode(model: Any, features: Mapping[str, Any], mods: Sequence[str], ks: list[int], retr_ks: list[int],
            rows: Tensor, cfg: EvalConfig, device: torch.device, log: Log, code_rows: Tensor | None = None) -> _Encoded:
    """One pass over ``features``, one encoding per batch; the heads run per prefix length k on it. The
    transformer runs on every row for the retrieval prefixes ``retr_ks``, else on the probe ``rows`` only;
    ``code_rows`` (sorted) also get their read code, in the same pass."""
    model = model.to(device).eval()
    n = len(features[mods[0]])
    in_rows, in_codes = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    in_rows[rows] = True
    if code_rows is not None:
        in_codes[code_rows] = True
    shared: dict[str, dict[int, list[Tensor]]] = {m: {k: [] for k in retr_ks} for m in mods}
    regs: dict[str, list[Tensor]] = {m: [] for m in mods}
    codes: dict[str, list[Tensor]] = {m: [] for m in mods}
    read: dict[str, list[Tensor]] = {m: [] for m in mods}
    recon: dict[str, dict[int, list[Tensor]]] = {m: {k: [] for k in ks} for m in mods}
    for start in range(0, n, cfg.batch_size):
        end = min(start + cfg.batch_size, n)
        sel, csel = in_rows[start:end].to(device), in_codes[start:end].to(device)
        if not retr_ks and not bool(sel.any()) and not bool(csel.any()):
            continue
        log(f"encode {end}/{n}")
        for m in mods:
            enc = model.encoders[m]
            x = torch.from_numpy(np.asarray(features[m][start:end])).to(device, torch.float32)
            if retr_ks:
                full = enc.registers_of(x)  # (B, R, d)
                for k in retr_ks:
                    keep = torch.full((len(x),), k, dtype=torch.long, device=device)
                    shared[m][k].append(enc.embed_shared(full, keep).float().cpu())
            code = enc.read_code(x).float() if bool(csel.any()) else None  # (B, K)
            if code is not None:
                read[m].append(code[csel].cpu())
            if not bool(sel.any()):
                continue
            full = full[sel] if retr_ks else enc.registers_of(x[sel])  # (b, R, d)
            x = x[sel]
            regs[m].append(full.flatten(1).half().cpu())
            codes[m].append((code[sel] if code is not None else enc.read_code(x).float()).cpu())
            target = enc.as_tokens(x)  # (b, T, D_in)
            for k in ks:
                keep = torch.full((len(x),), k, dtype=torch.long, device=device)
                recon[m][k].append(cosine(enc.outputs(full, keep).recon, target).cpu())
    cat = torch.cat
    return _Encoded(shared={m: {k: cat(v) for k, v in per.items()} for m, per in shared.items()},
                    registers={m: cat(v) for m, v in regs.items()}, codes={m: cat(v) for m, v in codes.items()},
                    recon={m: {k: cat(v) for k, v in per.items()} for m, per in recon.items()},
                    read={m: cat(v) for m, v in read.items()} if code_rows is not None else None)


def subset(n: int, cap: int, seed: int) -> Tensor:
    """A seeded subset of range(n) of at most ``cap`` rows (0: all), sorted."""
    if not cap or cap >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def _parts(model: Any, features: Mapping[str, Any], labels: Mapping[str, np.ndarray],
           schema: Mapping[str, Mapping[str, Any]], cfg: EvalConfig, fit: FitRows | None,
           fitted: tuple[Tensor, _Encoded] | None, rows: Tensor, enc: _Encoded, ks: list[int], device: torch.device,
           log: Log) -> dict[str, Any]:
    """Probes, the part summary and reconstruction with its references, fitted on ``fit`` (its probe rows and
    their encoding: ``fitted``) or on a part of here."""
    mods, mcfg = model.modalities, model.cfg
    test_labels = {name: torch.as_tensor(np.asarray(col))[rows] for name, col in labels.items()}
    if fit is not None and fitted is not None:
        fit_rows, fenc = fitted
        fit_labels = {name: torch.as_tensor(np.asarray(col))[fit_rows] for name, col in fit.labels.items()}
        test, test_rows = enc, rows
        split = {"source": fit.source, "train": len(fit_rows), "test": len(rows), "rows": len(rows),
                 "train_available": len(fit.features[mods[0]])}
    else:  # no training rows: a held-out part of this split
        tr, te = split_indices(len(rows), cfg.probe_test_fraction, cfg.seed)
        fenc, test, test_rows = _slice(enc, tr), _slice(enc, te), rows[te]
        fit_labels = {name: col[tr] for name, col in test_labels.items()}
        test_labels = {name: col[te] for name, col in test_labels.items()}
        split = {"source": "a part of the evaluated split (no training rows were given)", "train": len(tr),
                 "test": len(te), "rows": len(rows)}
    targets, notes = label_targets(fit_labels, None, test_labels, schema)
    width = mcfg.hidden_dim
    raw = {m: (fenc.codes[m], test.codes[m]) for m in mods}
    probes = probe_rows(fenc.registers, test.registers, targets, probe_plan(ks, mcfg.n_shared), mcfg.n_shared,
                        width, raw, cfg.seed, cfg.probe_val_fraction, log)
    split.update(seed=cfg.seed, val_fraction_of_train=cfg.probe_val_fraction,
                 feature="the group's registers, concatenated; raw = the input in the read's PCA basis")
    return {"probes": probes, "probe_split": split, "notes": notes,
            "label_parts": {name: schema.get(name, {}).get("group") for name in targets},
            "parts": part_summary(probes, schema, mods, mcfg.n_shared, mcfg.n_registers),
            "reconstruction": _reconstruction(model, features, test_rows, fenc, test, ks, cfg, device, log)}


def _slice(enc: _Encoded, idx: Tensor) -> _Encoded:
    return _Encoded(shared={}, registers={m: v[idx] for m, v in enc.registers.items()},
                    codes={m: v[idx] for m, v in enc.codes.items()},
                    recon={m: {k: v[idx] for k, v in per.items()} for m, per in enc.recon.items()})


@torch.no_grad()
def _reconstruction(model: Any, features: Mapping[str, Any], rows: Tensor, fit: _Encoded, test: _Encoded,
                    ks: list[int], cfg: EvalConfig, device: torch.device, log: Log) -> list[dict[str, Any]]:
    """Per (k, modality), on the test ``rows``: the decoder's reconstruction cosine beside the per-position training
    mean's and a ridge readout's from the same k registers (fitted on ``fit``, into the decoder's code space), each
    against the standardised input itself (a second pass reads it)."""
    width = model.cfg.hidden_dim
    codes: dict[str, dict[Any, Tensor]] = {}
    for m in model.modalities:
        codes[m] = {"mean": fit.codes[m].mean(0, keepdim=True).expand(len(rows), -1)}
        for k in ks:
            log(f"reconstruction references {m} k={k}")
            cols = slice(0, k * width)
            readout = RidgeMap.fit(fit.registers[m][:, cols], fit.codes[m], cfg.seed)
            codes[m][k] = readout(test.registers[m][:, cols]).float()  # (P, K)
    sums = {m: dict.fromkeys(codes[m], 0.0) for m in model.modalities}
    for i in range(0, len(rows), cfg.batch_size):
        idx = rows[i: i + cfg.batch_size].numpy()
        for m in model.modalities:
            enc = model.encoders[m]
            x = torch.from_numpy(np.asarray(features[m][idx[0]: idx[-1] + 1])[idx - idx[0]]).to(device, torch.float32)
            target = enc.as_tokens(x)  # (b, T, D_in)
            for key, c in codes[m].items():
                sums[m][key] += float(cosine(enc.decode_code(c[i: i + len(idx)].to(device)), target).sum())
    return [{"k": k, "modality": m, "cosine": float(test.recon[m][k].mean()),
             "mean_reference": sums[m]["mean"] / len(rows), "ridge_reference": sums[m][k] / len(rows)}
            for m in model.modalities for k in ks]


def _check_lengths(features: Mapping[str, Any], labels: Mapping[str, np.ndarray], mods: Sequence[str]) -> int:
    missing = [m for m in mods if m not in features]
    if missing:
        raise RegtokError(f"features lack modality {missing[0]!r} (have {', '.join(features)})")
    sizes = {len(features[m]) for m in mods} | {len(v) for v in labels.values()}
    if len(sizes) != 1:
        raise RegtokError(f"features and labels disagree on the number of samples: {sorted(sizes)}")
    n = sizes.pop()
    if n < 2:
        raise RegtokError(f"evaluation needs at least 2 samples, got {n}")
    return n


def _baselines(n: int, pooled: Mapping[str, Any], mods: Sequence[str], cfg: EvalConfig,
               device: torch.device) -> dict[str, Any]:
    """Chance, and the raw pooled features compared by cosine when both modalities' dims match."""
    out: dict[str, Any] = {"chance": {d: chance_metrics(n, RECALL_KS) for d in ("a_to_b", "b_to_a")}}
    shapes = [tuple(pooled[m].shape[1:]) for m in mods]
    if any(len(s) != 1 for s in shapes):
        out["raw_pooled"] = {"skipped": "no pooled features given (the run uses tokens)"}
    elif shapes[0] != shapes[1]:
        out["raw_pooled"] = {"skipped": f"pooled dims differ: {shapes[0][0]} vs {shapes[1][0]}"}
    else:
        xa, xb = (l2_normalize(torch.from_numpy(np.asarray(pooled[m][:]))) for m in mods)  # (N, D)
        out["raw_pooled"] = retrieval_metrics(xa, xb, cfg.chunk_size, device)
    return out


@torch.no_grad()
def _flow(model: Any, shared: dict[str, dict[int, Tensor]], mods: Sequence[str], retr_ks: list[int],
          cfg: EvalConfig, device: torch.device, log: Log) -> list[dict[str, Any]]:
    """Retrieval of flow-transported shared embeddings (at the largest retrieval k), per step count."""
    if not getattr(model, "has_flow", False) or not retr_ks:
        return []
    k = retr_ks[-1]
    ea, eb = shared[mods[0]][k], shared[mods[1]][k]  # (N, E)
    out = []
    for steps in cfg.flow_steps:
        log(f"flow steps={steps}")
        moved_a = _transport(model, ea, "a_to_b", steps, cfg.batch_size, device)  # (N, E), in B's space
        moved_b = _transport(model, eb, "b_to_a", steps, cfg.batch_size, device)
        out.append({"k": k, "steps": steps,
                    "a_to_b": rank_metrics(paired_ranks(moved_a, eb, cfg.chunk_size, device)),
                    "b_to_a": rank_metrics(paired_ranks(moved_b, ea, cfg.chunk_size, device))})
    return out


def _transport(model: Any, x: Tensor, direction: str, steps: int, batch: int, device: torch.device) -> Tensor:
    parts = [model.transport(x[i: i + batch].to(device), direction, steps).float().cpu()
             for i in range(0, len(x), batch)]
    return torch.cat(parts)  # (N, E)
