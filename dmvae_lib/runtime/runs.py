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

import datetime as _dt
import fcntl
import json
import os
import platform
import subprocess
import time as _time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

SUMMARY = "summary.json"  # written last by a run: its presence is what "finished" means


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

    On an exception the temp file is removed; temp files left by killed writers are removed after a write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
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
        """Append `record` to metrics.jsonl (and, with
        TensorBoard on, its numbers as scalars `<tag>/<key>`)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
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
        file = self.path / "metrics.jsonl"
        return [json.loads(line) for line in file.read_text().splitlines() if line] if file.exists() else []

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


def load_state_strict(module: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """module.load_state_dict(strict=True) with an error that names `source` and the mismatched keys."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise RunError(f"{source}: weights do not fit {type(module).__name__}: {str(exc)[:500]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise RunError(f"{source}: weights do not fit {type(module).__name__}: "
                       f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
