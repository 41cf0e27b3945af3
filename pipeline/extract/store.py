"""The HDF5 feature store: one part per shard, a virtual-dataset index over all parts, and a reader.

Layout::

    STORE_DIR/parts/<shard-stem>.h5   /<modality>/pooled (n, D) f16, /<modality>/tokens (n, T, Dt) f16,
                                      /keys (n,) utf-8, /labels/<name> (n,) float64 (NaN where absent)
    STORE_DIR/features.h5             the same names over all parts in shard order (virtual datasets;
                                      /keys is copied, it is small), openable by any h5py user
    STORE_DIR/manifest.json           the features manifest

Parts are written (:class:`PartWriter`) to a temporary name, fsynced and renamed, so a part under its final
name is complete.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from regtok.errors import RegtokError

INDEX_NAME = "features.h5"
PARTS_DIR = "parts"
CHUNK_ROWS = 1024
KINDS = ("pooled", "tokens")
_GAP = 256  # rows: a gap this small between wanted rows is read through rather than seeked over,
_GAP_BYTES, _READ_BYTES = 4 << 20, 64 << 20  # when it is at most this many bytes; one read at most this many


class PartWriter:
    """Write one part incrementally, so a shard's features never sit in memory at once.

    Rows are held back until a full chunk (about 1 MiB, at most 1024 rows) is there, so every dataset is chunked
    ``(min(n, chunk), ...)``; :meth:`close` writes keys and labels, fsyncs and renames the file into place.
    """

    def __init__(self, path: str | os.PathLike, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.file = h5py.File(self.tmp, "w")
        self.keys: list[str] = []
        self.labels: list[dict[str, float]] = []
        self.shapes = {f"{m}/{k}": tuple(shape) for m, kinds in shapes.items() for k, shape in kinds.items()}
        self.chunk = {name: int(np.clip((1 << 20) // (2 * max(int(np.prod(s)), 1)), 1, CHUNK_ROWS))
                      for name, s in self.shapes.items()}
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in self.shapes}
        self.written = dict.fromkeys(self.shapes, 0)

    def append(self, keys: list[str], features: dict[str, dict[str, np.ndarray]],
               labels: list[dict[str, float]]) -> None:
        """Append rows: ``features[modality][kind]`` is ``(b, ...)``; ``labels`` one dict per row."""
        b = len(keys)
        given = {f"{m}/{k}": arr for m, kinds in features.items() for k, arr in kinds.items()}
        if given.keys() != self.shapes.keys():
            raise ValueError(f"features {sorted(given)} do not match the part's {sorted(self.shapes)}")
        for name, arr in given.items():
            if arr.shape != (b, *self.shapes[name]):
                raise ValueError(f"{name}: got {arr.shape}, expected {(b, *self.shapes[name])}")
            self.pending[name].append(arr.astype(np.float16, copy=False))
            if sum(len(a) for a in self.pending[name]) >= self.chunk[name]:
                self._flush(name)
        self.keys.extend(keys)
        self.labels.extend(labels)

    def _check_room(self, nbytes: int) -> None:
        check_room(self.tmp.parent, nbytes + (len(self.shapes) << 20))  # HDF5 may hold back 1 MiB per dataset

    def _flush(self, name: str) -> None:
        rows = np.concatenate(self.pending[name]) if self.pending[name] else np.zeros((0, *self.shapes[name]))
        self.pending[name] = []
        self._check_room(rows.size * 2)  # float16
        if name not in self.file:
            chunk = (max(min(len(rows), self.chunk[name]), 1), *self.shapes[name])
            self.file.create_dataset(name, shape=(0, *self.shapes[name]), maxshape=(None, *self.shapes[name]),
                                     dtype=np.float16, chunks=chunk)
        ds, start = self.file[name], self.written[name]
        ds.resize(start + len(rows), axis=0)
        ds[start:] = rows
        self.written[name] = start + len(rows)

    def close(self) -> int:
        """Finish the part (features, keys, labels as float64 with NaN where absent) and rename it into place."""
        f, n = self.file, len(self.keys)
        for name in self.shapes:
            self._flush(name)
        f.create_dataset("keys", data=np.array(self.keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
        for name in sorted({k for row in self.labels for k in row}):
            f.create_dataset(f"labels/{name}", data=np.array([row.get(name, np.nan) for row in self.labels],
                                                            dtype=np.float64))
        self._check_room(sum(len(k.encode()) + 16 for k in self.keys) + 8 * n * len(f.get("labels", {})))
        f.close()
        with open(self.tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(self.tmp, self.path)
        return n

    def abort(self) -> None:
        """Drop the temporary file (also after a failed write, e.g. a full disk, whose close may fail too)."""
        try:
            # Give the space back first, so that HDF5's closing flush finds room (see check_room).
            os.truncate(self.tmp, 0)
        except OSError:
            pass
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away; the first error is what matters
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def check_room(folder: Path, nbytes: int) -> None:
    """OSError(ENOSPC) unless ``folder``'s disk has room for ``nbytes`` more and HDF5's metadata.

    HDF5 must not meet a full disk itself: its failed writes surface only at flush or close, where h5py printed
    a traceback per object and then segfaulted (seen on a full tmpfs).
    """
    st = os.statvfs(folder)
    free, need = st.f_bavail * st.f_frsize, nbytes + (2 << 20)
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free in {folder}, "
                      f"about {need / 2**20:.1f} MiB needed)")


def write_index(root: str | os.PathLike, parts: list[str], shapes: dict[str, dict[str, tuple[int, ...]]],
                label_names: list[str]) -> int:
    """Write ``root/features.h5``: virtual datasets over ``parts`` (paths relative to ``root``) in order.

    ``shapes`` is ``{modality: {kind: per-row shape}}``. Labels a part lacks read as NaN. Returns the rows.
    """
    root = Path(root)
    counts, keys = [], []
    for rel in parts:
        with h5py.File(root / rel, "r") as f:
            keys.extend(k.decode() if isinstance(k, bytes) else k for k in f["keys"][:])
            present = set(f["labels"].keys()) if "labels" in f else set()
            counts.append((int(f["keys"].shape[0]), present))
    check_unique_keys(keys, parts, [c for c, _ in counts])
    n = sum(c for c, _ in counts)
    check_room(root, sum(len(k.encode()) + 16 for k in keys) + 8 * n * len(label_names))
    tmp = root / f".{INDEX_NAME}.{os.getpid()}.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
        for modality, kinds in shapes.items():
            for kind, row_shape in kinds.items():
                _virtual(f, f"{modality}/{kind}", parts, counts, n, tuple(row_shape), np.float16, 0)
        for name in label_names:
            _virtual(f, f"labels/{name}", parts, counts, n, (), np.float64, np.nan, label=name)
    os.replace(tmp, root / INDEX_NAME)
    return n


def check_unique_keys(keys: list[str], parts: list[str], counts: list[int]) -> None:
    """RegtokError naming the first key that two rows share: twin rows would tie each other in retrieval."""
    seen: dict[str, int] = {}
    owner = np.repeat(np.arange(len(parts)), counts)  # part index of each row
    dups = 0
    first = None
    for row, key in enumerate(keys):
        if key in seen:
            dups += 1
            first = first or (key, parts[owner[seen[key]]], parts[owner[row]])
        else:
            seen[key] = row
    if first is not None:
        key, a, b = first
        where = f"in {a} twice" if a == b else f"in {a} and {b}"
        raise RegtokError(f"duplicate sample key {key!r} {where} ({dups} duplicate row(s) in all); keys must be "
                          f"unique across the store: fix the shards and run the same command again (finished parts "
                          f"of unchanged shards are kept)")


def _virtual(f: h5py.File, name: str, parts: list[str], counts: list, n: int, row_shape: tuple[int, ...],
             dtype, fill, label: str | None = None) -> None:
    layout = h5py.VirtualLayout(shape=(n, *row_shape), dtype=dtype)
    offset = 0
    for rel, (rows, present) in zip(parts, counts, strict=True):
        if rows and (label is None or label in present):
            layout[offset:offset + rows] = h5py.VirtualSource(rel, name, shape=(rows, *row_shape))
        offset += rows
    f.create_virtual_dataset(name, layout, fillvalue=fill)


@dataclass(repr=False)
class FeatureStore:
    """A read-only view of a feature store (see the module docstring)."""

    root: Path
    """The store's directory."""
    manifest: dict
    """Its features manifest: encoders, feature kinds, label schema, parts, lineage."""
    modalities: tuple[str, ...]
    """The modalities it holds, in pair order."""
    n: int
    """Rows (paired samples)."""

    def __repr__(self) -> str:
        """``FeatureStore('x', N=500, vision pooled (768,) tokens (257, 1024), …, labels material (10 classes))``."""
        mods = []
        for m in self.modalities:
            kinds = [f"{k} {(self.shape(k, m)[1],) if k == 'pooled' else self.shape(k, m)}" for k in KINDS
                     if self.has(k)]
            mods.append(f"{m} {' '.join(kinds)}")
        schema = self.manifest.get("labels") or {}
        labels = [f"{name} ({len(spec['classes'])} classes)" if spec.get("type") == "categorical" else name
                  for name, spec in schema.items()]
        shown = ", ".join(labels[:6]) + (f", … ({len(labels)} labels)" if len(labels) > 6 else "")
        return f"FeatureStore({str(self.root)!r}, N={self.n}, {', '.join(mods)}, labels {shown or 'none'})"

    def keys(self) -> list[str]:
        """Sample keys in row order."""
        with self._open() as f:
            return [k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]]

    def has(self, kind: str) -> bool:
        """Whether the store holds ``kind`` ("pooled" or "tokens") features."""
        return kind in self.manifest.get("feature_kinds", ["pooled"])

    def shape(self, kind: str, modality: str) -> tuple[int, int]:
        """``(n_tokens, dim)`` of one row; pooled features are ``(1, D)``."""
        enc = self._encoder(modality)
        if kind == "pooled":
            return (1, int(enc["pooled_dim"]))
        self._check_kind(kind)
        t, d = enc["token_shape"]
        return (int(t), int(d))

    def read(self, kind: str, modality: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """float16 features: pooled ``(n, D)``, tokens ``(n, T, D)``; ``rows`` selects and orders rows."""
        self._check_kind(kind)
        self._encoder(modality)
        with self._open() as f:
            if f"{modality}/{kind}" not in f:
                raise RegtokError(f"{self.root / INDEX_NAME} has no /{modality}/{kind}; rebuild the store with "
                                  f"`regtok extract`")
            ds = f[f"{modality}/{kind}"]
            if rows is None:
                rows = np.arange(self.n)
                out = ds[:]
            elif isinstance(rows, slice):
                rows = np.arange(self.n)[rows]
                contiguous = len(rows) and (len(rows) == 1 or np.all(np.diff(rows) == 1))
                out = ds[rows[0]:rows[-1] + 1] if contiguous else read_rows(ds, rows, self.n)
            else:
                rows = np.asarray(rows)
                out = read_rows(ds, rows, self.n)
        self._check_finite(out, rows, kind, modality)
        return out

    def _check_finite(self, out: np.ndarray, rows: np.ndarray, kind: str, modality: str) -> None:
        """RegtokError naming the first row of ``out`` (by its store row and key) that holds NaN or inf."""
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)  # (len(out),)
        if not bad.any():
            return
        rows = np.flatnonzero(rows) if rows.dtype == bool else np.where(rows < 0, rows + self.n, rows)
        row = int(rows[np.flatnonzero(bad)[0]])
        raise RegtokError(f"{self.root}: the {modality} {kind} features are not finite (NaN or inf) in row {row} "
                          f"(key {self.keys()[row]!r}; {int(bad.sum())} such row(s) in this read); re-extract "
                          f"the store")

    def labels(self, names: bool = False) -> dict[str, np.ndarray]:
        """``{name: (n,)}``: int64 class indices for categorical labels without gaps, else float64 with NaN where
        absent. With ``names``, categorical labels come as their class names instead (object arrays, None where
        absent); :meth:`label_classes` maps an index to its name."""
        schema = self.manifest.get("labels") or {}
        out = {}
        with self._open() as f:
            for name in f["labels"].keys() if "labels" in f else []:
                arr = f[f"labels/{name}"][:]
                categorical = (schema.get(name) or {}).get("type") == "categorical"
                out[name] = arr.astype(np.int64) if categorical and np.isfinite(arr).all() else arr
        for name in [n for n in out if names and (schema.get(n) or {}).get("type") == "categorical"]:
            classes = self.label_classes(name)
            out[name] = np.array([classes[int(v)] if v == v else None for v in out[name]], dtype=object)
        return out

    def label_classes(self, name: str) -> list[str]:
        """The class names of a categorical label, in index order: ``label_classes("material")[i]`` is class i."""
        spec = (self.manifest.get("labels") or {}).get(name)
        if spec is None:
            raise RegtokError(f"store {self.root} has no label {name!r} (has: {', '.join(self.labels()) or 'none'})")
        if spec.get("type") != "categorical":
            raise RegtokError(f"label {name!r} is {spec.get('type')}, not categorical: it has no classes")
        return list(spec["classes"])

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.root / INDEX_NAME, "r")
        except OSError as e:
            raise RegtokError(f"{self.root / INDEX_NAME}: cannot open the store index ({e})") from None

    def _encoder(self, modality: str) -> dict:
        enc = self.manifest.get("encoders", {}).get(modality)
        if enc is None:
            raise RegtokError(f"store {self.root} has no modality {modality!r} (has: {', '.join(self.modalities)})")
        return enc

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown feature kind {kind!r}")
        if not self.has(kind):
            raise RegtokError(f"store {self.root} holds no {kind} features (extract with --tokens)")


def read_rows(ds, rows: np.ndarray, n: int) -> np.ndarray:
    """``ds[rows]`` for any integer/bool index array, read as a few sorted contiguous ranges."""
    rows = (np.flatnonzero(rows) if rows.dtype == bool else rows).astype(np.int64)
    if len(rows) and (rows.min() < -n or rows.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    rows = np.where(rows < 0, rows + n, rows)
    uniq = np.unique(rows)  # sorted
    out = np.empty((len(uniq), *ds.shape[1:]), dtype=ds.dtype)
    row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:])))  # ViT-L-14 tokens: gaps of 7, reads of 127
    gap, span = min(_GAP, _GAP_BYTES // row_bytes), max(1, _READ_BYTES // row_bytes)
    for run in np.split(np.arange(len(uniq)), np.flatnonzero(np.diff(uniq) > gap) + 1) if len(uniq) else []:
        for part in np.split(run, np.flatnonzero(np.diff((uniq[run] - uniq[run[0]]) // span)) + 1):
            lo, hi = uniq[part[0]], uniq[part[-1]]
            out[part] = ds[lo:hi + 1][uniq[part] - lo]
    return out[np.searchsorted(uniq, rows)]


def open_store(path: str | os.PathLike) -> FeatureStore:
    """Open a feature store by its directory or its manifest.json; RegtokError if it is not one."""
    from regtok.pipeline.manifests.manifest import manifest_path, read_manifest

    mpath = manifest_path(path)
    if not mpath.is_file():
        raise RegtokError(f"{path}: not a feature store (no manifest.json)")
    m = read_manifest(mpath, kind="features")
    root = mpath.parent
    samples, modalities = m.get("samples"), m.get("modalities")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise RegtokError(f"{mpath}: field 'samples' must be a count of rows, got {samples!r}; was it edited?")
    if not (isinstance(modalities, list) and modalities and all(isinstance(x, str) for x in modalities)):
        raise RegtokError(f"{mpath}: field 'modalities' must be a list of modality names, got {modalities!r}")
    if not isinstance(m.get("encoders"), dict):
        raise RegtokError(f"{mpath}: field 'encoders' must map each modality to its encoder record")
    check_parts(root, m)
    if not (root / INDEX_NAME).is_file():
        raise RegtokError(f"{root}: feature store index {INDEX_NAME} is missing")
    store = FeatureStore(root=root, manifest=m, modalities=tuple(modalities), n=samples)
    with store._open() as f:
        for modality in modalities:
            for kind in m.get("feature_kinds") or ["pooled"]:
                ds = f.get(f"{modality}/{kind}")
                if not isinstance(ds, h5py.Dataset) or ds.shape[0] != samples:
                    found = "missing" if ds is None else f"of shape {getattr(ds, 'shape', '?')}"
                    raise RegtokError(f"{root / INDEX_NAME}: /{modality}/{kind} is {found}, the manifest records "
                                      f"{samples} rows; rebuild the store with `regtok extract`")
        for name in virtual_sources(f):  # a file the index reads but the manifest may not list: zeros if absent
            if not (Path(name) if Path(name).is_absolute() else root / name).is_file():
                raise RegtokError(f"{root}: the index reads {name}, which is missing; rebuild it by running the "
                                  "same `regtok extract` command again")
    return store


def virtual_sources(f: h5py.File) -> set[str]:
    """The files the virtual datasets of an open index read (as the index names them)."""
    sources: set[str] = set()
    f.visititems(lambda name, obj: sources.update(vs.file_name for vs in obj.virtual_sources())
                 if isinstance(obj, h5py.Dataset) and obj.is_virtual else None)
    return sources


HASH_PARTS_UP_TO = 256 << 20  # bytes: a store this small has every part hashed when it is opened


def check_parts(root: Path, m: dict) -> None:
    """Every part the manifest lists exists with its recorded size (and sha256, when the store is small).

    The index is a virtual dataset: a missing part would read as rows of zeros, so it is an error here.
    """
    from regtok.pipeline.manifests.manifest import sha256_file

    parts = m.get("parts")
    if parts is None:
        return
    if not isinstance(parts, list) or not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in parts):
        raise RegtokError(f"{root}: the manifest's 'parts' must be a list of part records")
    again = "rebuild it by running the same `regtok extract` command again"
    cmd = m.get("command")
    if isinstance(cmd, list) and cmd[:2] == ["regtok", "extract"]:
        again += f" ({' '.join(map(str, cmd))})"
    hash_them = sum(r.get("bytes") or 0 for r in parts) <= HASH_PARTS_UP_TO
    for rec in parts:
        p = root / rec["path"]
        if not p.is_file():
            raise RegtokError(f"{root}: part {rec['path']} is missing; {again}")
        size = p.stat().st_size
        changed = rec.get("bytes") is not None and size != rec["bytes"]
        changed = changed or (hash_them and rec.get("sha256") is not None and sha256_file(p) != rec["sha256"])
        if changed:
            raise RegtokError(f"{root}: part {rec['path']} has changed since it was written (size or sha256 "
                              f"differs from the manifest); {again}")
