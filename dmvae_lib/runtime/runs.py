"""Run directories: every run writes its config, metrics, figures, checkpoints and summary in one place.

    runs/<notebook>/<name>/
        config.json      resolved config + provenance (git sha, torch version, device)
        metrics.jsonl    one JSON object per logged step
        summary.json     final numbers that downstream notebooks and reports read
        figures/         .html (interactive) and .png (static, when a Chrome is available)
        ckpt/<tag>/last.pt, step_XXXXXXX.pt
        tensorboard/     the same scalars as metrics.jsonl, only when TensorBoard logging is on

TensorBoard logging is off by default (and then costs no import). Turn it on with the environment variable
DMVAE_TENSORBOARD=1 (it reaches papermill kernels and torchrun workers) or `RunDir(..., tensorboard=True)`;
it needs the optional `tensorboard` package (`pip install -e '.[logging]'`). metrics.jsonl stays the record
that notebooks and tests read.

Re-opening an existing run with the same config resumes it; with a different config it raises, so nothing
already written is overwritten silently. A run folder is owned by one process at a time: `RunDir.create`
takes an exclusive `fcntl.flock` on `<run>/.lock` (the file records the holder's PID) and holds it while any
RunDir of that folder lives in the process (a notebook kernel: until it exits). A second process gets
`RunLockedError` naming the folder and the PID. The kernel drops the lock when the holder dies, SIGKILL
included, so a killed run never leaves a stale lock and resumes at once. Checkpoints are written atomically
(temp file, then rename) and loaded strictly: a missing, truncated or mismatched file raises an error naming
the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import time as _time
import weakref
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

SUMMARY = "summary.json"  # written last by a run: its presence is what "finished" means
METRICS = "metrics.jsonl"
KEPT = "its previous version, if any, is left as it was"  # what a failed atomic write leaves
TORN_SUFFIX = ".torn"  # incomplete last lines of metrics.jsonl, moved aside (`repair_torn_tail`)

log = logging.getLogger(__name__)


def is_finished(folder: str | os.PathLike) -> bool:
    """Whether the run in `folder` finished: the one place this rule is written."""
    return (Path(folder) / SUMMARY).is_file()


def read_summary(folder: str | os.PathLike) -> dict:
    """A finished run's summary.json, {} for an unfinished one."""
    return json.loads((Path(folder) / SUMMARY).read_text()) if is_finished(folder) else {}


class RunError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked."""


class RunLockedError(RunError):
    """Another process holds the run folder (its lock file names the PID)."""


LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive `fcntl.flock` on `<folder>/.lock`, held until `release()` or garbage collection.

    The kernel releases a flock when its holder's last file descriptor closes, which a process death (SIGKILL
    too) does, so a lock is never stale; the PID written into the file only serves the error message. One
    process takes a folder's lock once: `acquire` returns the lock it already holds (a flock on a second file
    descriptor of the same file would conflict with the first). Files open without inheritance, so
    subprocesses (torchrun workers) do not hold it; forked children (DataLoader workers) share it.
    """

    _held: "weakref.WeakValueDictionary[Path, FolderLock]" = weakref.WeakValueDictionary()

    def __init__(self, folder: Path, file):
        self.folder, self._file = folder, file

    @staticmethod
    def _flock(folder: Path):
        """The open lock file of `folder` with the flock taken; RunLockedError naming the holder's PID if
        taken."""
        # never truncated before the lock is ours: the holder's PID stays
        file = open(folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise RunLockedError(f"{folder} is in use by another process "
                                 f"(PID {holder}, lock {folder / LOCK_NAME}); "
                                 "two processes must not write one run: wait for it to end or stop it "
                                 "(the lock goes with the process, even when it is killed), "
                                 "or choose another run name") from None
        return file

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> "FolderLock":
        """Lock `folder` (created if missing) for this process; raise RunLockedError if another one holds
        it."""
        folder = Path(folder).resolve()
        held = cls._held.get(folder)
        if held is not None and held._file is not None:
            return held
        folder.mkdir(parents=True, exist_ok=True)
        file = cls._flock(folder)
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        lock = cls(folder, file)
        cls._held[folder] = lock
        return lock

    @classmethod
    def probe(cls, folder: str | os.PathLike) -> None:
        """Raise RunLockedError if another process holds `folder` now; create and change nothing."""
        folder = Path(folder).resolve()
        if (folder / LOCK_NAME).is_file() and folder not in cls._held:
            cls._flock(folder).close()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
            if FolderLock._held.get(self.folder) is self:
                del FolderLock._held[self.folder]

    def __del__(self) -> None:
        self.release()


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_run_name(preset: str, seed: int) -> str:
    return f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}_{preset}_s{seed}"


STALE_TEMP_SECONDS = 600.0  # a temp file untouched this long belongs
                            # to a writer that died (SIGKILL, power loss)


def _remove_stale_temps(path: Path, keep: Path) -> None:
    """Delete `.<name>.tmp<pid>` files beside `path`, other than `keep`, not modified for STALE_TEMP_SECONDS.

    A writer killed mid-write cannot clean up after itself; an active writer keeps touching its file, and only
    one process (rank 0) writes a given path, so an old temp file is garbage.
    """
    now = _time.time()
    for other in path.parent.glob(f".{path.name}.tmp*"):
        try:
            if other != keep and now - other.stat().st_mtime > STALE_TEMP_SECONDS:
                other.unlink()
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file_obj) on a temp file beside `path`, fsync, then rename over `path`.

    On an exception the temp file is removed and `path` keeps its previous content; temp files left by killed
    writers are removed after a write. A failed write to the disk (a full disk, a quota, an I/O error) raises
    `WriteError` naming `path` and the cause: `torch.save` reports a full disk only as
    "[enforce fail at inline_container.cc] unexpected pos", with the OSError deep in its chain.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with named_write_errors(path):
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _remove_stale_temps(path, tmp)


@contextlib.contextmanager
def named_write_errors(path: str | os.PathLike, kept: str = KEPT):
    """Inside: a failed write (`write_failure`) raises WriteError naming `path` (the artifact, not whatever
    temp file the writer used) and the cause; other exceptions pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except BaseException as exc:
        cause = write_failure(exc)
        if cause is None:
            raise
        raise WriteError(Path(path), cause, kept) from exc


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: `exc` itself, one in its cause/context chain, or None.

    torch.save's zip writer turns a full disk into a RuntimeError ("unexpected pos") whose chain may or may
    not keep the OSError; an "unexpected pos" without one is reported as ENOSPC, its only known cause."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if isinstance(exc, RuntimeError) and "unexpected pos" in str(exc):
        return OSError(28, "No space left on device (torch.save: unexpected pos)")
    return None


class WriteError(OSError):
    """A file could not be written; the message names the file, the cause and the free space left. An OSError
    (errno kept), so callers that handle OSError still do."""

    def __init__(self, path: Path, cause: OSError, kept: str = KEPT):
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free there now"
        except OSError:
            free = "free space unknown"
        super().__init__(cause.errno, f"could not write {path}: {cause.strerror or cause} ({free}); {kept}")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


def repair_torn_tail(file: Path) -> None:
    """Make an append-only JSON-lines file end on a complete line before the next append.

    A writer killed (or out of disk) mid-append leaves an incomplete last line; the next record would be glued
    onto it and both lost. The incomplete bytes move to `<file>.torn` (appended, for inspection) and the file
    is cut back to its last newline; a last line that is complete JSON only lacking its newline is kept.
    Logs one warning naming the file."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(file, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1  # 0 when the file holds only the torn line
        tail = data[cut:]
        if _json_record(tail) is not None:
            f.seek(size)
            f.write(b"\n")
            log.warning("%s: its last record lacked a newline; added one", file)
            return
        with open(file.with_name(file.name + TORN_SUFFIX), "ab") as torn:
            torn.write(tail + b"\n")
        f.truncate(cut)
    log.warning("%s: dropped an incomplete last line (%d bytes; a writer stopped mid-append), kept in %s",
                file, len(tail), file.name + TORN_SUFFIX)


def _json_record(line: bytes | str):
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def read_jsonl(file: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist). A line that is not a JSON object (the
    incomplete last line of a killed writer, or one an older version glued onto it) is skipped with a warning
    naming the file and the line; every complete record is kept."""
    try:
        data = Path(file).read_bytes()
    except FileNotFoundError:
        return []
    out, lines = [], data.split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _json_record(line)
        if rec is None:
            what = "incomplete last line" if i == len(lines) else f"unreadable line {i}"
            log.warning("%s: skipped its %s (%d bytes)", file, what, len(line))
        else:
            out.append(rec)
    return out


TENSORBOARD_ENV = "DMVAE_TENSORBOARD"


def _tensorboard_env() -> bool:
    value = os.environ.get(TENSORBOARD_ENV, "").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ValueError(f"{TENSORBOARD_ENV}={value!r}: use 1 (log to TensorBoard too) or 0")
    return value in ("1", "true")


def _summary_writer_class():
    """torch's SummaryWriter, imported only when TensorBoard logging is on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"TensorBoard logging is on ({TENSORBOARD_ENV}=1 or RunDir(tensorboard=True)) but "
                          "the tensorboard package is missing: pip install tensorboard (or pip install -e "
                          f"'.[logging]'), or turn it off with {TENSORBOARD_ENV}=0") from exc
    return SummaryWriter


@dataclass
class RunDir:
    path: Path
    tensorboard: bool | None = None  # also write scalars to <path>/tensorboard/;
                                     # None: DMVAE_TENSORBOARD decides
    _writer: Any = field(default=None, init=False, repr=False, compare=False)
    # a FolderLock while this RunDir owns it
    _lock: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(cls, root: str | os.PathLike, notebook: str, name: str, config: Mapping[str, Any],
               device: str = "", tensorboard: bool | None = None) -> "RunDir":
        """Create runs/<notebook>/<name>/ and write config.json, or reopen it if the config is identical.

        The returned RunDir holds the folder's lock (`FolderLock`) for as long as it lives: another process
        that creates the same run raises RunLockedError naming the folder and the holder's PID. A different
        config raises before anything is written. With TensorBoard logging on, a missing tensorboard package
        raises here, before any training.
        """
        path = Path(root) / notebook / name
        run = cls(path, tensorboard)
        if run.tensorboard_on:
            _summary_writer_class()  # a missing package fails now, not at the first logged step
        record = {"config": dict(config), "git_sha": _git_sha(), "torch": torch.__version__,
                  "python": platform.python_version(), "device": device}
        cfg_file = path / "config.json"

        def check_config() -> bool:  # True: the run exists with this config
            if not cfg_file.exists():
                return False
            old = json.loads(cfg_file.read_text())
            if old.get("config") != json.loads(json.dumps(dict(config))):
                raise RunError(f"{path} already holds a run with a different config; choose another run_name "
                               f"or delete {path} to start over")
            return True

        check_config()  # a refusal leaves the folder as it was (no lock file either)
        run._lock = FolderLock.acquire(path)
        try:
            if check_config():  # again under the lock: another process may have created it meanwhile
                return run
            (path / "figures").mkdir(exist_ok=True)
            atomic_write_bytes(cfg_file, lambda f: f.write(json.dumps(record, indent=2).encode()))
        except BaseException:
            run._lock = None  # dropped with the last reference
            raise
        return run

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def tensorboard_on(self) -> bool:
        return _tensorboard_env() if self.tensorboard is None else self.tensorboard

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append `record` to metrics.jsonl as one line written in one call (and, with TensorBoard on, its
        numbers as scalars `<tag>/<key>`). An incomplete last line left by a killed writer is moved aside
        first (`repair_torn_tail`); a failed write raises WriteError naming the file."""
        file = self.path / METRICS
        line = (json.dumps(dict(record)) + "\n").encode()
        try:
            repair_torn_tail(file)
            with open(file, "ab") as f:
                f.write(line)
        except OSError as exc:
            raise WriteError(file, exc, "its earlier records are kept (a partly written line is moved aside "
                                        "at the next append)") from exc
        if self.tensorboard_on:
            self._log_scalars(record)

    def _log_scalars(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._writer = _summary_writer_class()(log_dir=str(self.path / "tensorboard"))
        prefix = f"{record['tag']}/" if isinstance(record.get("tag"), str) else ""
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(prefix + key, value, global_step=record.get("step"))
        self._writer.flush()  # records are rare (log_every) and a notebook may end any time

    def __getstate__(self) -> dict:
        # a live SummaryWriter (or lock) does not pickle
        return {**self.__dict__, "_writer": None, "_lock": None}

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's records; an incomplete or unreadable line is skipped with a warning
        (`read_jsonl`)."""
        return read_jsonl(self.path / METRICS)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        file = self.path / SUMMARY
        atomic_write_bytes(file, lambda f: f.write(json.dumps(dict(summary), indent=2).encode()))
        return file

    def ckpt_path(self, tag: str, step: int | None = None) -> Path:
        name = "last.pt" if step is None else f"step_{step:07d}.pt"
        return self.path / "ckpt" / tag / name


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """torch.save `{"schema": 1, **payload}` atomically."""
    atomic_write_bytes(Path(path), lambda f: torch.save({"schema": 1, **payload}, f))


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; raise RunError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    check_zip_crc(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign files fail inside pickle/zip with many exception types
        raise RunError(f"checkpoint {path} is unreadable (truncated or not a torch file): {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("schema") != 1:
        raise RunError(f"checkpoint {path} is not a dmvae_lib checkpoint (schema 1)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise RunError(f"checkpoint {path} lacks {missing}; it has {sorted(ckpt)}")
    return ckpt


def check_zip_crc(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record, but torch.load never checks them: bytes
    flipped inside a tensor load silently as other numbers. Check them (one read of the file, ≈ 1 s/GB)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a zip (or truncated): torch.load below names the file
    except zlib.error as exc:
        bad = f"{exc}"
    if bad is not None:
        raise RunError(f"checkpoint {path} is corrupt: its record {bad!r} fails its CRC-32 check (bytes "
                       "changed after it was written); restore it or rerun the stage that wrote it")


def load_state_strict(module: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """module.load_state_dict(strict=True) with an error that names `source` and the mismatched keys."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise RunError(f"{source}: weights do not fit {type(module).__name__}: {str(exc)[:500]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise RunError(f"{source}: weights do not fit {type(module).__name__}: "
                       f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
