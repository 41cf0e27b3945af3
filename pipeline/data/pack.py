"""Pack a real paired dataset laid out as a CSV of relative image paths (TVL / SSVTP style) into shards.

Each CSV row becomes one sample ``KEY.vision.<ext>``, ``KEY.tactile.<ext>``, ``KEY.json`` (or one image, when
only one modality's column is given: touch-only query images for ``regtok embed``): the image bytes are copied
unchanged (after checking that they decode), the json holds every CSV column as text, and the label columns
are turned into numbers (numeric columns as floats, string columns as class indices whose names go into the
manifest's ``labels``; free text such as a caption stays text; ``COL:class`` and ``COL:text`` decide). A row
whose image is missing or unreadable is skipped and recorded. The schema comes from the packed rows, or from
another split's ``dataset.json`` (``labels_from``) so that a class has the same index in every split.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from regtok.errors import RegtokError
from regtok.pipeline.data.shards import IMAGE_EXTS, prepare_out_dir, remove_stale_shards, shard_name, write_shard
from regtok.pipeline.manifests.labels import class_list, is_number, label_schema, with_groups
from regtok.pipeline.manifests.manifest import environment, file_record, input_ref, new_manifest, write_manifest

Sample = tuple[str, list[tuple[str, bytes]]]
Packable = tuple[int, str, dict[str, str], list[tuple[str, Path]]]  # row number, key, row, (member, image path)


def read_rows(csv_path: Path, columns: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV; RegtokError if the file is missing or lacks one of ``columns``."""
    if not csv_path.is_file():
        raise RegtokError(f"CSV not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RegtokError(f"cannot read CSV {csv_path}: {e}") from None
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:  # DictReader would keep the last of the two silently
        raise RegtokError(f"{csv_path}: the header names column {twice[0]!r} twice; rename one of them")
    missing = [c for c in columns if c not in header]
    if missing:
        raise RegtokError(f"{csv_path}: no column {', '.join(map(repr, missing))} "
                          f"(columns: {', '.join(header) or 'none'})")
    return header, rows


LABEL_KINDS = ("class", "text")  # COL:class, COL:text


def label_columns(label_cols: Sequence[str]) -> dict[str, str | None]:
    """``--label-col`` values as ``{column: kind}``: ``COL`` (None: inferred from the values), ``COL:class`` or
    ``COL:text``."""
    out: dict[str, str | None] = {}
    for text in label_cols:
        col, sep, kind = text.rpartition(":")
        out[col if sep and kind in LABEL_KINDS else text] = kind if sep and kind in LABEL_KINDS else None
    return out


def schema_from(dataset_json: str | Path, label_cols: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The label schema of another split's ``dataset.json``, for ``label_cols`` (default: all its labels)."""
    from regtok.pipeline.manifests.manifest import read_manifest

    path = Path(dataset_json)
    if not path.is_file():
        raise RegtokError(f"--labels-from: no such file: {path}")
    labels = read_manifest(path, kind="dataset").get("labels") or {}
    unknown = [c for c in label_cols if c not in labels]
    if unknown:
        raise RegtokError(f"--labels-from {path} has no label {', '.join(map(repr, unknown))} "
                          f"(labels: {', '.join(labels) or 'none'})")
    return {c: labels[c] for c in (label_cols or labels)}


def image_columns(vision_col: str | None, tactile_col: str | None) -> dict[str, str]:
    """``{modality: CSV column}`` of the modalities to pack (one alone when the other's column is None)."""
    columns = {m: col for m, col in (("vision", vision_col), ("tactile", tactile_col)) if col}
    if not columns:
        raise RegtokError("pack needs an image column: --vision-col, --tactile-col or both")
    return columns


def check_values(packable: list[Packable], labels: dict[str, dict[str, Any]], where: str) -> None:
    """RegtokError for a packed row whose value a reused schema cannot hold (an unseen class, text for a number)."""
    for number, _, row, _ in packable:
        for col, spec in labels.items():
            text = (row.get(col) or "").strip()
            if not text:
                continue
            if spec["type"] == "categorical" and text not in spec["classes"]:
                raise RegtokError(f"row {number}: {col} {text!r} is not a class of {where} "
                                  f"({class_list(spec['classes'])})")
            if spec["type"] == "continuous" and not is_number(text):
                raise RegtokError(f"row {number}: {col} {text!r} is not a number, as {where} has it")


def label_values(row: dict[str, str], labels: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The json fields of a row's labels: a number (or null) per label, plus ``<col>_name`` for categories."""
    out: dict[str, Any] = {}
    for col, spec in labels.items():
        text = (row.get(col) or "").strip()
        if spec["type"] == "continuous":
            out[col] = float(text) if text else None
        elif spec["type"] == "categorical":
            out[col] = spec["classes"].index(text) if text else None
            out[f"{col}_name"] = text
    return out


def member_ext(path: Path) -> str:
    """The member extension of an image file: its suffix, lower case, ``jpeg`` spelled ``jpg``."""
    ext = path.suffix.lower().lstrip(".") or "img"
    return "jpg" if ext == "jpeg" else ext


def load_image(path: Path) -> bytes:
    """The file's bytes after checking that they decode as an image; ValueError(reason) otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"missing image {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() does not catch truncated pixel data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"unreadable image {path}: {e}") from None
    return data


def check_rows(rows: list[dict[str, str]], root: Path, columns: dict[str, str], skipped: list[dict[str, Any]],
               progress: Callable[[int], None] | None = None, allow_outside_root: bool = False) -> list[Packable]:
    """The packable rows, each image checked to decode; append ``{"row", "key", "reason"}`` to ``skipped``
    for the rest.

    ``columns`` maps modality name -> CSV column. Rows are numbered from 1 (the header is not a row) and the
    key is that number, zero-padded, so keys point back to the CSV whatever is skipped. An image path that
    resolves (symlinks followed) outside ``root`` is skipped unless ``allow_outside_root``.
    """
    real_root = root.resolve()
    width = max(6, len(str(len(rows))))
    packable: list[Packable] = []
    first_of: dict[tuple[Path, ...], int] = {}  # the images of a packed row → its number
    for number, row in enumerate(rows, start=1):
        key = f"{number:0{width}d}"
        try:
            members = [_member(modality, (row.get(col) or "").strip(), col, root, real_root, allow_outside_root)
                       for modality, col in columns.items()]
            same = tuple(path.resolve() for _, path in members)
            if same in first_of:  # twin samples would tie each other in retrieval
                raise ValueError(f"duplicate of row {first_of[same]} (the same images)")
        except (ValueError, OSError) as e:
            skipped.append({"row": number, "key": key, "reason": str(e)})
        else:
            first_of[same] = number
            packable.append((number, key, row, members))
        if progress is not None:
            progress(1)
    return packable


def _member(modality: str, rel: str, col: str, root: Path, real_root: Path,
            allow_outside_root: bool) -> tuple[str, Path]:
    """(member name, path) of one image cell, checked: present, under ``root``, of a kind extract reads, decodable;
    ValueError(reason) otherwise."""
    if not rel:
        raise ValueError(f"empty {col!r} cell")
    path = root / rel
    if not allow_outside_root and not path.resolve().is_relative_to(real_root):
        raise ValueError(f"image {rel} lies outside --root {root} (pass --allow-outside-root to read it)")
    ext = member_ext(path)
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image {rel} has the extension .{ext}, which extract does not read (it reads "
                         f"{', '.join('.' + e for e in IMAGE_EXTS)}); convert it to PNG")
    load_image(path)
    return f"{modality}.{ext}", path


def iter_samples(packable: list[Packable], labels: dict[str, dict[str, Any]]) -> Iterator[Sample]:
    """The checked rows as samples: the image bytes as they are on disk and a json of the row and its labels."""
    for number, key, row, images in packable:
        try:
            members = [(name, path.read_bytes()) for name, path in images]
        except OSError as e:
            raise RegtokError(f"row {number}: {e.filename} went away while packing ({e.strerror})") from None
        record = {"key": key, "row": number, **{k: v for k, v in row.items() if k is not None},
                  **label_values(row, labels)}
        members.append(("json", json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()))
        yield key, members


def pack_csv(csv_path: str | Path, root: str | Path | None, out_dir: str | Path, *, vision_col: str | None = "url",
         tactile_col: str | None = "tactile", label_cols: Sequence[str] = (), samples_per_shard: int = 1000,
         progress: Callable[[int], None] | None = None,
         on_rows: Callable[[int], None] | None = None, allow_outside_root: bool = False,
         overwrite: bool = False, labels_from: str | Path | None = None,
         label_groups: dict[str, str] | None = None) -> dict[str, Any]:
    """Pack ``csv_path`` (image paths relative to ``root``, default: the CSV's folder) into ``out_dir``.

    Writes ``shard-000000.tar`` … of up to ``samples_per_shard`` samples and ``out_dir/dataset.json``, and
    returns that manifest. ``on_rows`` is told the number of CSV rows once they are read; ``progress`` is
    called with 1 per row handled. Images outside ``root`` are skipped unless ``allow_outside_root``;
    ``out_dir`` must be empty or hold an earlier pack output, unless ``overwrite``. ``labels_from`` (another
    split's ``dataset.json``) gives the label schema, whose columns are the default ``label_cols``. A column of
    None packs the other modality alone. ``label_groups`` ({label: "shared" | a modality}) says which part should
    hold a label.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent if root is None else Path(root)
    if samples_per_shard < 1:
        raise RegtokError(f"--samples-per-shard must be at least 1 (got {samples_per_shard})")
    if not root.is_dir():
        raise RegtokError(f"image root is not a directory: {root}")
    columns = image_columns(vision_col, tactile_col)
    named = label_columns(label_cols)
    given = schema_from(labels_from, list(named)) if labels_from is not None else None
    header, rows = read_rows(csv_path, [*columns.values(), *(given or named)])
    with_groups({c: {} for c in (given or named)}, label_groups or {}, list(columns))  # checked before any work
    if on_rows is not None:
        on_rows(len(rows))
    out = Path(out_dir)
    prepare_out_dir(out, "pack", overwrite)
    start = time.perf_counter()
    skipped: list[dict[str, Any]] = []
    packable = check_rows(rows, root, columns, skipped, progress, allow_outside_root)
    if not packable:
        reason = skipped[0]["reason"] if skipped else "the CSV has no rows"
        raise RegtokError(f"{csv_path}: no row could be packed ({len(skipped)} skipped; first: {reason})")
    labels = with_groups(_schema(packable, named, given, labels_from), label_groups or {}, list(columns))
    records = write_shards(iter_samples(packable, labels), out, samples_per_shard)
    seconds = time.perf_counter() - start
    total = sum(r["samples"] for r in records)
    config = {"csv": str(csv_path), "root": str(root), "vision_col": vision_col, "tactile_col": tactile_col,
              "label_cols": list(label_cols), "samples_per_shard": samples_per_shard,
              **({"allow_outside_root": True} if allow_outside_root else {}),  # only when used: older manifests stay
              **({"labels_from": str(Path(labels_from).absolute())} if labels_from is not None else {}),
              **({"label_groups": dict(label_groups)} if label_groups else {})}
    manifest = new_manifest(
        "dataset", command=_command(config, out), config=config,
        inputs=[input_ref("csv", csv_path, out),
                *([input_ref("labels_from", Path(labels_from), out)] if labels_from is not None else [])],
        outputs={"samples": total, "shards": len(records)},  # the shard files are listed in "shards"
        environment_=environment(), timings={"seconds": round(seconds, 3)},
        shards=[{k: r[k] for k in ("path", "samples", "bytes", "sha256")} for r in records], samples=total,
        modalities=list(columns), labels=labels, skipped=skipped,
        source={"csv": str(csv_path.absolute()), "root": str(root.absolute()), "rows": len(rows),
                "columns": header, "image_columns": columns})
    write_manifest(out / "dataset.json", manifest)
    return manifest


def _schema(packable: list[Packable], named: dict[str, str | None], given: dict[str, dict[str, Any]] | None,
            labels_from: str | Path | None) -> dict[str, dict[str, Any]]:
    """The label schema: ``given`` (another split's, checked against the packed values) or the packed rows'."""
    if given is not None:
        check_values(packable, given, f"--labels-from {labels_from}")
        return given
    packed = [row for _, _, row, _ in packable]  # a skipped row's values do not enter the schema
    return label_schema({c: [row.get(c) for row in packed] for c in named},
                        as_class=[c for c, kind in named.items() if kind == "class"],
                        as_text=[c for c, kind in named.items() if kind == "text"])


def write_shards(samples: Iterator[Sample], out: Path, samples_per_shard: int) -> list[dict[str, Any]]:
    """``samples`` into ``out/shard-NNNNNN.tar`` of up to ``samples_per_shard`` each (stale higher ones removed);
    one file record with its sample count per shard."""
    records = []
    while (first := next(samples, None)) is not None:
        path = out / shard_name(len(records))
        n = write_shard(path, itertools.chain([first], itertools.islice(samples, samples_per_shard - 1)))
        records.append({"samples": n, **file_record(path, out)})
    remove_stale_shards(out, [out / r["path"] for r in records])
    return records


def _command(config: dict[str, Any], out: Path) -> list[str]:
    """The ``regtok pack`` command line that gives ``config``."""
    return ["regtok", "pack", config["csv"], "--root", config["root"], "--out", str(out),
            *(a for flag in ("vision_col", "tactile_col") if config[flag]
              for a in (f"--{flag.replace('_', '-')}", config[flag])),
            *(x for c in config["label_cols"] for x in ("--label-col", c)),
            "--samples-per-shard", str(config["samples_per_shard"]),
            *(["--allow-outside-root"] * config.get("allow_outside_root", False)),
            *(["--labels-from", config["labels_from"]] if "labels_from" in config else []),
            *(x for name, g in config.get("label_groups", {}).items() for x in ("--label-group", f"{name}={g}"))]
