"""The encryption job: VOC → (plain or keyed) WebDataset shards + manifest, parallel and resumable.

Work is cut into shards; each shard is one task (``workers.py`` runs them) that reads, decodes,
resizes, encrypts and writes its samples to a temporary file; the job's own process then renames
it into place and drops a small completion record, so a worker that outlives a killed job can
never add a shard under a final name.  A shard's bytes depend only on its inputs, the key
material and the options, so the output is byte-identical whatever ``--jobs`` or backend ran it,
and a resumed run only redoes shards without a verified record.  The manifest is written last; a directory without one is an
unfinished job.

Workers receive the compiled key *material*, never the key file's secret.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keyshard import __version__, faults, shardformat
from keyshard.errors import KeyshardError
from keyshard.fsutil import fsync_path, sha256_file, write_json_atomic
from keyshard.keys import Key
from keyshard.methods import Material
from keyshard.manifest import library_versions
from keyshard.tasks import for_kind as task_for_kind  # (a ShardTask is a unit of work, not a Task)
from keyshard.transforms import compile_plan
from keyshard.pipeline import MAX_PIXELS
from keyshard.pipeline import manifest as manifest_mod
from keyshard.pipeline import workers as workers_mod
from keyshard.pipeline.samples import BadSample, load_torch, replica_seed
from keyshard.pipeline.splits import SPLITS, split_ids
from keyshard.pipeline.voc import SampleRef, VocSource

PARTIAL_DIR = ".keyshard-partial"


@dataclass(frozen=True)
class EncryptOptions:
    """Everything that changes the bytes of the output (recorded in job.json and the manifest)."""

    size: int = 256
    splits: tuple[str, ...] = SPLITS
    shard_size: int = 128
    augment_copies: int = 0
    augment_seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    split_seed: int = 0
    holdout: int | None = None
    skip_bad: bool = False
    max_pixels: int = MAX_PIXELS  # larger images / label maps (from their headers) are bad samples


@dataclass(frozen=True)
class ShardTask:
    name: str
    split: str
    replica: int
    dataset_kind: str  # the manifest's dataset kind: which task reads (and writes) the samples
    refs: tuple[SampleRef, ...] = field(repr=False)


# -- worker side ----------------------------------------------------------------------------

_PLAN_CACHE: dict = {}


def _plan_for(material: Material | None, size: int):
    """Compile the key once per worker process (plans are pure functions of material and size)."""
    if material is None:
        return None
    ident = (hashlib.sha256(material.canonical_bytes()).digest(), material.method, material.block_size, size)
    if ident not in _PLAN_CACHE:
        _PLAN_CACHE.clear()
        _PLAN_CACHE[ident] = compile_plan(material, size, size)
    return _PLAN_CACHE[ident]


def _single_threaded_torch():
    torch = load_torch()  # torch + torchvision's image ops, without the torchvision package
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # parallelism comes from joblib; avoid oversubscribing cores


def _exit_without_teardown() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(0)


_FAST_EXIT = False


_WATCHED_PARENT: int | None = None
PARENT_POLL_S = 0.25


def exit_with_parent(owner: int | None) -> None:
    """In a worker process of this job: exit as soon as the process that started it is gone.

    A worker's parent is the ``encrypt`` process (forked workers, loky, multiprocessing); when that
    dies (even by SIGKILL) the worker is re-parented, so a watchdog thread that sees ``getppid()``
    change ends the worker within ``PARENT_POLL_S`` — idle or busy — instead of encoding on for
    minutes (its shards could never be renamed into place: only the owner does that).  No-op in
    the main process and when the parent is not the owner (a dask worker belongs to its cluster,
    not to the client).
    """
    global _WATCHED_PARENT
    if owner is None or os.getpid() == owner or _WATCHED_PARENT is not None or os.getppid() != owner:
        return
    _WATCHED_PARENT = owner

    def watch():
        while os.getppid() == owner:
            time.sleep(PARENT_POLL_S)
        os._exit(70)

    threading.Thread(target=watch, name="keyshard-parent-watch", daemon=True).start()


def warm_up(material: Material | None, size: int, fast_exit: bool = False, owner: int | None = None) -> int:
    """Load torch and compile the key in a fresh worker while the main process plans the job.

    ``fast_exit`` (loky workers only): when the idle worker is shut down at the end of the
    program, skip the interpreter's teardown of torch (~0.3 s, over 1 s on a busy machine),
    which the main process would otherwise wait for.  By then the worker has left loky's loop
    and multiprocessing has flushed its streams; every shard and record it wrote is closed.
    """
    global _FAST_EXIT
    exit_with_parent(owner)
    _single_threaded_torch()
    _plan_for(material, size)
    if fast_exit and not _FAST_EXIT:
        _FAST_EXIT = True
        atexit.register(_exit_without_teardown)  # last registered, so it runs first
    return os.getpid()


def process_shard(task: ShardTask, material: Material | None, options: EncryptOptions,
                  partial_dir: str, owner: int | None = None, labels=None) -> dict:
    """Write one shard under a temporary name and return its completion record (with ``tmp``,
    the temporary path, which ``commit_shard`` renames in the job's own process).

    ``labels``: a ``folders.LabelSpec`` (lookup table, class count, ignore index) for a folder
    dataset; None for VOC, whose masks meet VOC's own checks.  The shard's dataset kind picks the
    task, which reads each sample (``Task.sample_reader``) and names its target's member."""
    exit_with_parent(owner)
    if owner not in (None, os.getpid()):  # a pool worker: a test may kill it at this shard (keyshard.faults)
        faults.point("encrypt.worker", task.name)
    _single_threaded_torch()
    plan = _plan_for(material, options.size)
    partial = Path(partial_dir)
    tmp = partial / "tmp" / f"{task.name}.{os.getpid()}"
    inputs, failed = [], []
    sample_task = task_for_kind(task.dataset_kind)
    read_sample = sample_task.hook("sample_reader")
    with open(tmp, "wb") as f:
        writer = shardformat.ShardWriter(f)
        for ref in task.refs:
            try:
                seed = replica_seed(options.augment_seed, ref.voc_id, task.replica) if task.replica else None
                img, target, orig, row, key_id = read_sample(ref, seed, options, labels)
            except BadSample as exc:
                if not options.skip_bad:
                    raise
                failed.append({"id": ref.voc_id, "split": task.split, "replica": task.replica,
                               "reason": str(exc)})
                continue
            pixels = plan.encrypt(img) if plan is not None else img
            meta = {"id": ref.voc_id, "orig_size": list(orig), "split": task.split, "replica": task.replica}
            inputs.append(row)
            sample = {"__key__": shardformat.sample_key(key_id, task.replica),
                      "img.npy": shardformat.encode_npy(pixels),
                      sample_task.target_member: sample_task.encode_target(target),
                      "json": shardformat.encode_meta({**meta, **sample_task.sample_meta(target)})}
            writer.write(sample)
        stats = writer.close()
    # The shard stays under its temporary name: the process that owns the job renames it into
    # place (``commit_shard``), so nothing appears under a final name once that process is gone.
    return {"file": task.name, "split": task.split, "replica": task.replica,
            "samples": stats.samples, "bytes": stats.bytes, "sha256": stats.sha256,
            "inputs": inputs, "failed": failed, "tmp": str(tmp)}


def commit_shard(out: Path, partial: Path, record: dict) -> dict:
    """In the job's own process: rename a finished shard into place and record it as done.

    Not fsynced here: rename is atomic, resume re-hashes every shard against its record, and
    run() fsyncs each finished shard in the background before it writes the manifest."""
    record = dict(record)
    os.replace(record.pop("tmp"), out / record["file"])
    # the record is re-checked against the shard's hash on resume, so it need not be fsynced
    write_json_atomic(partial / "done" / f"{record['file']}.json", record, tmp_dir=partial / "tmp", durable=False)
    return record


# -- planning -------------------------------------------------------------------------------

def plan_tasks(source: VocSource, options: EncryptOptions) -> tuple[list[ShardTask], dict]:
    """Split ids, resolve every file up front (a missing one fails before any work), cut shards.

    Each shard holds one replica index of one split, so a training epoch can read replica r of
    every id from its own shards without touching the others.
    """
    train_ids = source.split_ids("train") if {"train", "holdout"} & set(options.splits) else []
    val_ids = source.split_ids("val") if "test" in options.splits else None
    splits = split_ids(train_ids, val_ids, options.split_seed, options.holdout) if train_ids else {"test": sorted(val_ids or [])}
    split_file = {"train": "train.txt", "holdout": "train.txt", "test": "val.txt"}
    tasks, counts = [], {}
    label = getattr(source, "split_file_label", lambda s: f"ImageSets/Segmentation/{split_file[s]}")
    for split in options.splits:
        ids = splits[split]
        refs = [source.ref(i, label(split)) for i in ids]
        counts[split] = len(ids)
        replicas = 1 + (options.augment_copies if split == "train" else 0)
        index = 0
        for replica in range(replicas):
            for start in range(0, len(refs), options.shard_size):
                chunk = tuple(refs[start:start + options.shard_size])
                tasks.append(ShardTask(shardformat.shard_name(split, index), split, replica, source.dataset_kind, chunk))
                index += 1
    return tasks, counts


def job_identity(source: VocSource, key: Key | None, options: EncryptOptions) -> dict:
    """What must match for ``--resume`` to continue a directory (anything that changes bytes)."""
    split_files = {}
    for name in ("train", "val"):
        try:
            split_files[f"{name}.txt"] = source.split_sha256(name)
        except KeyshardError:
            pass
    extra = source.identity() if hasattr(source, "identity") else {}  # folder datasets: mask folder, pairing
    return {
        "keyshard": __version__,
        "libraries": library_versions(),
        "source": {"kind": source.kind, "path": str(Path(source.path).resolve()), "root": source.layout_root,
                   "split_files": split_files, **extra},
        "encryption": None if key is None else {
            "method": key.method, "block_size": key.block_size, "key_fingerprint": key.fingerprint},
        "options": json.loads(json.dumps(asdict(options))),
    }


def _stale_partial(out: Path) -> bool:
    """A ``.keyshard-partial/`` left by a run that died before writing ``job.json`` (e.g. a disk
    already full): no job record, no finished shard, nothing else in the output — safe to clean."""
    partial = out / PARTIAL_DIR
    try:
        return (partial.is_dir() and not (partial / "job.json").exists()
                and not any((partial / "done").glob("*")) and [p.name for p in out.iterdir()] == [PARTIAL_DIR])
    except OSError:
        return False


def _refuse_output(out: Path, resume: bool) -> None:
    """The refusals of ``prepare_output`` that need nothing but the directory itself."""
    partial = out / PARTIAL_DIR
    if (out / manifest_mod.MANIFEST).exists():
        raise KeyshardError(f"{out}: already holds a finished dataset (manifest.json); choose a new output directory")
    if _stale_partial(out):
        shutil.rmtree(partial)  # a run that died before it recorded its job: nothing to keep
    if partial.is_dir():
        if not resume:
            raise KeyshardError(f"{out}: holds an unfinished run; pass `resume=True` to continue it, or choose a new output directory")
    else:
        try:
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise KeyshardError(f"{out}: exists and is not an empty directory; refusing to write into it")
        except OSError as exc:
            raise KeyshardError(f"{out}: cannot create output directory ({exc.strerror})") from None


def prepare_output(out: Path, identity: dict, resume: bool) -> Path:
    """Create or re-open the output directory; refuse anything that could mix or lose data."""
    _refuse_output(out, resume)
    partial = out / PARTIAL_DIR
    if partial.is_dir():
        try:
            previous = json.loads((partial / "job.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise KeyshardError(f"{partial / 'job.json'}: unreadable; cannot check that `resume` continues the same job") from None
        changed = [k for k in identity if previous.get(k) != identity[k]]
        if changed:
            raise KeyshardError(
                f"{out}: was started with different {', '.join(changed)}; refusing to resume into it "
                "(use the original settings or a new output directory)")
        shutil.rmtree(partial / "tmp", ignore_errors=True)
    else:
        try:
            (partial / "done").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyshardError(f"{out}: cannot create output directory ({exc.strerror})") from None
        write_json_atomic(partial / "job.json", identity)
    (partial / "tmp").mkdir(parents=True, exist_ok=True)
    (partial / "done").mkdir(parents=True, exist_ok=True)
    return partial


def finished_record(out: Path, partial: Path, name: str) -> dict | None:
    """A shard's record if the shard on disk still matches it byte for byte, else None."""
    try:
        record = json.loads((partial / "done" / f"{name}.json").read_text())
        shard = out / name
        if shard.stat().st_size != record["bytes"]:
            return None
        return record if sha256_file(shard) == record["sha256"] else None
    except (OSError, ValueError, KeyError):
        return None


# -- driver ---------------------------------------------------------------------------------


def run(voc: str | None, out: str, key: Key | None, options: EncryptOptions, jobs: int = -1,
        backend: str = workers_mod.DEFAULT_BACKEND, resume: bool = False, command: list[str] | None = None,
        progress: bool = True, folders=None) -> dict:
    """Run (or resume) an encryption job and return the manifest written to ``out``.

    ``backend``: ``processes`` (forked local workers) or a joblib backend (``workers.BACKENDS``).
    ``folders``: a ``folders.FolderDataset`` (``--image-dir/--mask-dir``) or an
    ``image_folder.ImageFolderDataset`` (``--image-folder``) instead of ``voc``."""
    if key is not None and options.size % key.block_size:
        raise KeyshardError(f"{key.path or 'key'}: block size {key.block_size} does not divide the image size {options.size}")
    material = key.material if key is not None else None
    labels, dataset, label_record = folders.check() if folders is not None else (None, None, {})
    _refuse_output(Path(out), resume)  # the usual mistake is reported before any worker starts
    backend = workers_mod.resolve_backend(backend)
    warm_args = (material, options.size, backend == "loky", os.getpid())
    # Start the workers before planning: each spends ~1 s loading torch, and that overlaps with
    # indexing the source, resume checks and the output directory set-up here.  (This process
    # never imports torch when workers do the encoding.)
    with workers_mod.open_workers(backend, jobs, warm_up, warm_args) as workers:
        # absolute paths: dask workers may run in another directory (or on another node)
        source = folders.open(options.split_seed) if folders is not None else VocSource.open(os.path.abspath(voc))
        tasks, counts = plan_tasks(source, options)
        out_path = Path(out)
        identity = job_identity(source, key, options)
        if folders is not None:  # what the labels mean and how they were mapped: part of the job
            identity["source"].update(label_record)
            identity["dataset"] = dataset
        partial = prepare_output(out_path, identity, resume)
        records = {}
        todo = []
        for task in tasks:
            rec = finished_record(out_path, partial, task.name) if resume else None
            if rec is not None:
                records[task.name] = rec
            else:
                todo.append(task)
        # Largest shards first: the short last shard of each split/replica then fills the end of
        # the run instead of leaving a worker idle (bytes do not depend on order).
        todo.sort(key=lambda t: len(t.refs), reverse=True)
        workers.ready()
        _encode(workers, todo, tasks, records, material, options, out_path, partial, key, progress, labels)

    ordered = [records[t.name] for t in tasks]
    fsync_path(out_path)
    doc = manifest_mod.build(identity, key, options, ordered, counts, command or sys.argv,
                             dataset=identity.get("dataset"), split_rule=getattr(source, "rule", None))
    if getattr(source, "mask_resize", None):  # image folders: no masks
        doc["image"]["mask_resize"] = source.mask_resize
    manifest_mod.write(out_path, doc)
    shutil.rmtree(partial, ignore_errors=True)
    return doc


def _encode(workers, todo, tasks, records, material, options, out_path, partial, key, progress, labels=None):
    """Run the shard tasks on ``workers``; fsync each finished shard in the background."""
    from tqdm import tqdm

    total = sum(len(t.refs) for t in tasks)
    done = sum(r["samples"] + len(r["failed"]) for r in records.values())
    label = "plain" if key is None else f"{key.method} M={key.block_size}"
    bar = tqdm(total=total, initial=done, unit="img", desc=f"encrypt {label}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    # Shards are fsynced on a background thread while later shards are being made: the wait
    # is disk I/O, so durability costs almost no throughput (a blocking fsync per shard cost
    # ~10% here).  The manifest is written only after every fsync has returned.
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyshard-fsync")
    synced = [syncer.submit(fsync_path, out_path / name) for name in records]
    try:
        results = workers.run_unordered(process_shard, [
            (t, material, options, str(partial.absolute()), os.getpid(), labels)
            for t in todo])
        for rec in results:
            rec = commit_shard(out_path, partial, rec)
            faults.point("encrypt.commit")  # a test may stop the job here, its workers still busy
            records[rec["file"]] = rec
            synced.append(syncer.submit(fsync_path, out_path / rec["file"]))
            bar.update(rec["samples"] + len(rec["failed"]))
        for future in synced:
            future.result()
    except (BadSample, KeyshardError) as exc:
        raise KeyshardError(f"{exc} (run stopped; no manifest written)") from None
    except OSError as exc:
        raise KeyshardError(f"{out_path}: cannot write shard ({exc.strerror or exc})") from None
    finally:
        bar.close()
        syncer.shutdown(wait=True, cancel_futures=True)
