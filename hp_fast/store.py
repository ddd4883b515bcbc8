"""Sharded, resumable capture stores: a folder of safetensors shards plus ``manifest.json``.

Layout of a store folder::

    manifest.json              format version, model fingerprint, prompt hash, settings, shape,
                               dtype, shard size, and the finished shards (id, file, [start,
                               stop), sha256, bytes, batch size)
    prompts.json               the prompts (and image names), written once at creation
    shard-000000.safetensors   samples [start, stop): "z.<aggregate>" (s, L, H, dh) float32 per
                               aggregate, plus per-sample extras ("num_image_tokens" (s,) int64)
    manifest.part-NAME.json    (several writers only) the shards writer NAME finished

Shard ``i`` covers samples ``[i*S, min((i+1)*S, n))``. Every file is written under a temporary
name (``.NAME.tmp``), fsynced, renamed with ``os.replace`` and the folder fsynced, so a kill
leaves either the old file or the complete new one. The manifest is rewritten after each shard.

Batches never cross a shard boundary (``ShardedStore.batches``): batch formation depends only on
the shard layout and the batch size, never on where a run resumed, so a resumed run forms the
same batches as an uninterrupted one and gives the same bits (on a deterministic device). When
the shard size is a multiple of the batch size these are also the batches of an in-memory
capture. The batch size is not a setting: another one on resume is allowed (padding and matmul
shapes change rounding only); each shard records the one it was made with.

Resume (``ShardedStore.open`` on a folder with a manifest): the stored header (``HEADER_FIELDS``)
must equal this run's, else a ``ValueError`` names the field, both values and the fix
(``overwrite=True`` / ``--overwrite``). Recorded shards are checked (size and sha256); a bad one
is reported with a warning, renamed to ``NAME.corrupt-<time>`` and captured again. A shard file
that is complete but not yet recorded (kill between rename and manifest write) is adopted when
its embedded metadata belongs to this capture. ``overwrite`` deletes only files this capture
wrote (manifest, listed shards, its own tagged shards, temp files); a non-empty folder without a
manifest is refused.

Reading without loading: ``hp_fast.store_read`` (memmapped ``ShardedZ``); file format and
atomic writes: ``hp_fast.store_files``.

Several writers (torchrun, one process per rank)::

    header = ...                                   # the same on every rank
    if rank == 0:
        store = ShardedStore.open(dir, header, overwrite=overwrite, prompts=doc)  # create/repair
    barrier()
    if rank != 0:
        store = ShardedStore.open(dir, header, writer=False)   # validate only, never writes
    mine = store.pending()[rank::world]
    sink = ShardSink(store, shard_ids=mine, part=f"rank{rank}")   # records in its own part file
    capture_batches(model, n, make_batch, aggs, sink, batch_size=bs,
                    batches=store.batches(mine, bs))
    barrier()
    if rank == 0:
        store.merge_parts()                        # fold part files into manifest.json

Each shard is an independent file, so ranks never write the same file; ``pending()`` of a
``writer=False`` store also counts the shards in part files, so a rank restarted alone skips
what it had finished.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .store_files import (SHARD_FORMAT, file_sha256, map_tensors, read_shard_header, set_aside,
                          write_json, write_shard)

FORMAT = SHARD_FORMAT
MANIFEST = "manifest.json"
PROMPTS = "prompts.json"
DEFAULT_SHARD_SIZE = 1000
HEADER_FIELDS = ("format", "model", "prompt_hash", "num_samples", "shape", "dtype", "shard_size",
                 "settings")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


def header_digest(header: dict) -> str:
    core = {k: header.get(k) for k in HEADER_FIELDS}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def header_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """[(field, stored value, this run's value)] over ``HEADER_FIELDS`` (dicts field by field)."""
    out = []
    for key in HEADER_FIELDS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append((key, a, b))
    return out


def check_out_dir(folder) -> None:
    """A ValueError unless ``folder`` is missing, empty, or holds a manifest (cheap precheck)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a folder for a sharded capture, or a path "
                         "ending in .safetensors for one file")
    if folder.is_dir() and not (folder / MANIFEST).exists():
        foreign = [p.name for p in folder.iterdir() if not _is_temp(p.name)]
        if foreign:
            raise ValueError(f"{folder} is not empty ({', '.join(sorted(foreign)[:3])}, ...) and holds "
                             f"no {MANIFEST}: it is not an hp_fast capture; choose a new or empty "
                             "folder (nothing there was touched)")


def _is_temp(name: str) -> bool:
    return name.startswith((".shard-", ".manifest", ".prompts")) and name.endswith(".tmp")


def store_header(model, meta: dict, settings: dict, shard_size: int | None) -> dict:
    """The header ``ShardedStore.open`` creates or compares, from a capture's meta (model
    fingerprint, prompt hash, num_samples, shape) and its result-changing settings (plus the
    model's weight dtype, which the fingerprint may round away)."""
    if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int)
                                   or shard_size < 1):
        raise ValueError(f"shard_size={shard_size!r} must be a positive integer (prompts per shard)")
    return {"model": meta["model"], "prompt_hash": meta["prompt_hash"],
            "num_samples": meta["num_samples"], "shape": list(meta["shape"]), "dtype": "float32",
            "shard_size": shard_size, "meta": meta,
            "settings": dict(settings, model_dtype=str(next(model.parameters()).dtype))}


class ShardedStore:
    """A store folder: its manifest, the shard layout, finished shards and readers."""

    def __init__(self, folder: Path, manifest: dict):
        self.dir, self.manifest = folder, manifest

    # ---- layout ---------------------------------------------------------------------------
    @property
    def shard_size(self) -> int:
        return self.manifest["shard_size"]

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    @property
    def aggregates(self) -> list[str]:
        return list(self.manifest["settings"]["aggregates"])

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.num_samples)

    def done(self) -> dict[int, dict]:
        return {s["id"]: s for s in self.manifest["shards"]}

    def pending(self) -> list[int]:
        done = self.done()
        return [i for i in range(self.num_shards) if i not in done]

    def batches(self, shard_ids, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) of every batch of these shards; a batch never crosses a shard edge."""
        out = []
        for i in shard_ids:
            a, b = self.shard_range(i)
            out += [(s, min(s + batch_size, b)) for s in range(a, b, batch_size)]
        return out

    # ---- open / create / repair -----------------------------------------------------------
    @classmethod
    def read(cls, folder) -> "ShardedStore":
        """Open an existing store for reading (no checks of the shards yet)."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{folder} holds no readable {MANIFEST} ({err}); is it a folder "
                             "written by `hp-fast capture --out DIR`? To replace it, capture "
                             "with overwrite=True (CLI: --overwrite)") from err
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{folder / MANIFEST} has format {manifest.get('format')!r}, not "
                             f"{FORMAT!r}; capture again into a new folder")
        return cls(folder, manifest)

    @classmethod
    def open(cls, folder, header: dict, *, overwrite: bool = False, prompts: dict | None = None,
             writer: bool = True) -> "ShardedStore":
        """Create the store, or resume it after checking ``header`` (module docstring).

        header: HEADER_FIELDS (+ "meta"); shard_size None means the stored one (or the default).
        writer=False: only validate an existing store (other ranks); never writes."""
        folder = Path(folder)
        check_out_dir(folder)
        if overwrite and writer and (folder / MANIFEST).exists():
            cls.remove_capture(folder)
        if not (folder / MANIFEST).exists():
            if not writer:
                raise ValueError(f"{folder} holds no {MANIFEST} yet; rank 0 creates it first")
            return cls._create(folder, header, prompts)
        store = cls.read(folder)
        new = json.loads(json.dumps(dict(header, format=FORMAT)))
        if new.get("shard_size") is None:
            new["shard_size"] = store.shard_size
        diff = header_diff(store.manifest, new)
        if diff:
            field, old, now = diff[0]
            more = f" (also differ: {', '.join(d[0] for d in diff[1:])})" if diff[1:] else ""
            raise ValueError(f"{folder} holds another capture: {field} is {old!r} there but {now!r} "
                             f"in this run{more}. Resuming needs the same model, prompts and "
                             "settings; to start fresh pass overwrite=True (CLI: --overwrite), which "
                             "deletes only the files that capture wrote, or choose another folder")
        if writer:
            if not (folder / PROMPTS).exists():  # killed right after the manifest was created
                write_json(folder / PROMPTS, prompts or {})
            store.repair()
        else:  # what other writers finished (checked by rank 0's merge_parts / next repair)
            store.manifest["shards"] = sorted(store.part_entries().values(), key=lambda e: e["id"])
        return store

    def part_entries(self) -> dict[int, dict]:
        """{shard id: entry} of the manifest plus every writer's part file."""
        entries = self.done()
        for part in sorted(self.dir.glob("manifest.part-*.json")):
            entries.update({s["id"]: s for s in json.loads(part.read_text()).get("shards", [])})
        return entries

    @classmethod
    def _create(cls, folder: Path, header: dict, prompts: dict | None) -> "ShardedStore":
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():
            if _is_temp(p.name):
                p.unlink()
        manifest = json.loads(json.dumps(dict(header, format=FORMAT, shards=[])))
        if manifest.get("shard_size") is None:
            manifest["shard_size"] = DEFAULT_SHARD_SIZE
        manifest["shard_size"] = int(manifest["shard_size"])
        if manifest["shard_size"] < 1:
            raise ValueError(f"shard_size={manifest['shard_size']} must be at least 1")
        manifest["digest"] = header_digest(manifest)
        write_json(folder / MANIFEST, manifest)  # first: a folder with it is ours from now on
        write_json(folder / PROMPTS, prompts or {})
        return cls(folder, manifest)

    @staticmethod
    def remove_capture(folder: Path) -> None:
        """Delete what a capture wrote here (manifest, its shards, parts, temps), nothing else."""
        names = {MANIFEST, PROMPTS}
        try:
            names |= {s["file"] for s in json.loads((folder / MANIFEST).read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for p in folder.iterdir():
            ours = p.name in names or _is_temp(p.name) or (
                p.name.startswith("manifest.part-") and p.name.endswith(".json"))
            if not ours and p.name.startswith("shard-") and p.name.endswith(".safetensors"):
                try:
                    ours = read_shard_header(p)[0].get("__metadata__", {}).get("format") == FORMAT
                except ValueError:
                    ours = False
            if ours and p.is_file():
                p.unlink()

    def repair(self, checksums: bool = True) -> None:
        """Drop temp files, fold part files in, check every recorded shard (size, and sha256
        when ``checksums``), adopt complete unrecorded ones; bad shards are set aside (warning)
        and will be captured again."""
        for p in self.dir.iterdir():
            if _is_temp(p.name):
                p.unlink()
        entries = self.part_entries()
        good = []
        for i, s in sorted(entries.items()):
            path = self.dir / s["file"]
            if not path.exists():
                warnings.warn(f"capture shard {path} is listed but missing; it will be captured "
                              "again", stacklevel=3)
            elif path.stat().st_size != s["bytes"]:
                set_aside(path, f"is truncated ({path.stat().st_size} of {s['bytes']} bytes)")
            elif checksums and file_sha256(path) != s["sha256"]:
                set_aside(path, "fails its sha256 checksum")
            else:
                good.append(s)
        listed = {s["id"] for s in good}
        for i in range(self.num_shards):
            path = self.dir / shard_name(i)
            if i not in listed and path.exists():
                entry = self._adopt(i, path)
                if entry:
                    good.append(entry)
        self.manifest["shards"] = sorted(good, key=lambda s: s["id"])
        write_json(self.dir / MANIFEST, self.manifest)
        for part in self.dir.glob("manifest.part-*.json"):
            part.unlink()

    def _adopt(self, i: int, path: Path) -> dict | None:
        try:
            header, _ = read_shard_header(path)
            meta = json.loads(header["__metadata__"]["meta"])
            ok = (meta.get("digest") == self.manifest["digest"] and meta.get("id") == i)
            self.check_shard(i, path)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            set_aside(path, "is unreadable or not from this capture")
            return None
        a, b = self.shard_range(i)
        return {"id": i, "file": path.name, "start": a, "stop": b, "sha256": file_sha256(path),
                "bytes": path.stat().st_size, "batch_size": meta.get("batch_size")}

    # ---- writing ----------------------------------------------------------------------------
    def write(self, i: int, tensors: dict[str, torch.Tensor], batch_size: int | None,
              part: str | None = None) -> dict:
        """Write shard ``i`` and record it in the manifest (or in part file ``part``)."""
        a, b = self.shard_range(i)
        path = self.dir / shard_name(i)
        meta = {"digest": self.manifest["digest"], "id": i, "start": a, "stop": b,
                "batch_size": batch_size}
        sha, size = write_shard(path, tensors, meta)
        entry = {"id": i, "file": path.name, "start": a, "stop": b, "sha256": sha, "bytes": size,
                 "batch_size": batch_size}
        if part is None:
            self.manifest["shards"] = sorted([*self.done().values(), entry], key=lambda s: s["id"])
            write_json(self.dir / MANIFEST, self.manifest)
        else:
            target = self.dir / f"manifest.part-{part}.json"
            old = json.loads(target.read_text())["shards"] if target.exists() else []
            write_json(target, {"format": FORMAT, "digest": self.manifest["digest"],
                                "shards": [*old, entry]})
        return entry

    def merge_parts(self) -> None:
        """Fold every writer's part file into manifest.json (rank 0, after all ranks finished);
        the shards were just written, so sizes are checked, not checksums."""
        self.repair(checksums=False)

    # ---- reading ----------------------------------------------------------------------------
    def check_shard(self, i: int, path: Path | None = None) -> dict:
        """{tensor name: np.memmap} of shard ``i``, after checking names, dtypes and shapes."""
        path = path or self.dir / shard_name(i)
        a, b = self.shard_range(i)
        want = [b - a, *self.manifest["shape"][1:]]  # (s, L, H, dh)
        _, maps = map_tensors(path)
        for g in self.aggregates:
            m = maps.get(f"z.{g}")
            if m is None or list(m.shape) != want or m.dtype != np.float32:
                raise ValueError(f"{path}: z.{g} is missing or not float32 {want} as the manifest says")
        return maps

    def require_complete(self) -> None:
        missing = self.pending()
        if missing:
            raise ValueError(f"the capture in {self.dir} is incomplete: {len(missing)} of "
                             f"{self.num_shards} shards missing (first: {missing[0]}); run the "
                             "same capture command again to resume it")

    def extra(self, name: str) -> torch.Tensor | None:
        """A per-sample extra (e.g. num_image_tokens) of every shard, concatenated, or None."""
        parts = [self.check_shard(i).get(name) for i in range(self.num_shards)]
        if any(p is None for p in parts):
            return None
        return torch.from_numpy(np.concatenate([np.array(p) for p in parts]))


class ShardSink:
    """``CaptureSink`` that buffers at most one shard and writes it when it is complete.

    store: an opened ``ShardedStore``; shard_ids: the shards this writer may write (default:
    all); part: record finished shards in ``manifest.part-PART.json`` (several writers) instead
    of manifest.json; extras(start, stop) -> {name: (s,) tensor} stored with each shard;
    batch_size: recorded per shard. ``max_buffered_rows`` is the largest number of rows held."""

    def __init__(self, store: ShardedStore, *, shard_ids=None, part: str | None = None,
                 extras=None, batch_size: int | None = None):
        self.store, self.part, self.extras, self.batch_size = store, part, extras, batch_size
        self.allowed = None if shard_ids is None else {int(i) for i in shard_ids}
        n, *self.row_shape = store.manifest["shape"]
        self.current, self.filled, self.buf = None, 0, {}
        self.max_buffered_rows = 0
        self.written: list[int] = []

    def write(self, start: int, stop: int, z: dict[str, torch.Tensor]) -> None:
        i = start // self.store.shard_size
        a, b = self.store.shard_range(i)
        if stop > b or (self.allowed is not None and i not in self.allowed):
            raise ValueError(f"rows {start}..{stop - 1} cross the edge of shard {i} or belong to "
                             "another writer; build batches with ShardedStore.batches")
        if self.current != i:
            if self.current is not None and self.filled:
                raise ValueError(f"shard {self.current} was left incomplete before shard {i}")
            self.current, self.filled = i, 0
            self.buf = {g: self.buf[g] if g in self.buf and len(self.buf[g]) == b - a
                        else torch.empty(b - a, *self.row_shape) for g in z}  # (s, L, H, dh)
        if start != a + self.filled:
            raise ValueError(f"rows {start}..{stop - 1} arrived out of order in shard {i}")
        for g, rows in z.items():  # rows (B, L, H, dh)
            self.buf[g][start - a:stop - a] = rows
        self.filled += stop - start
        self.max_buffered_rows = max(self.max_buffered_rows, self.filled)
        if self.filled == b - a:
            tensors = {f"z.{g}": t for g, t in self.buf.items()}
            tensors.update(self.extras(a, b) if self.extras else {})
            self.store.write(i, tensors, self.batch_size, self.part)
            self.written.append(i)
            self.current, self.filled = None, 0


def capture_to_store(model, n: int, make_batch, aggregates, header: dict, out, *, batch_size: int,
                     overwrite: bool = False, progress: bool = True, prompts: dict | None = None,
                     extras=None, what: str = "prompts") -> ShardedStore:
    """Open (create or resume) the store at ``out`` and capture its missing shards into it
    (under torch.distributed: the ranks share the shards, ``hp_fast.distributed_work``)."""
    from .distributed import splitting
    if splitting():
        from .distributed_work import capture_to_store_ranks
        return capture_to_store_ranks(model, n, make_batch, aggregates, header, out,
                                      batch_size=batch_size, overwrite=overwrite,
                                      progress=progress, prompts=prompts, extras=extras, what=what)
    from .capture import capture_batches
    store = ShardedStore.open(out, header, overwrite=overwrite, prompts=prompts)
    todo = store.pending()
    if todo:
        sink = ShardSink(store, extras=extras, batch_size=batch_size)
        capture_batches(model, n, make_batch, aggregates, sink, batch_size=batch_size, what=what,
                        progress=progress, batches=store.batches(todo, batch_size))
    return store
