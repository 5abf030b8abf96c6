"""The adapter store: one folder per edit batch, a manifest of batches and profiles, exact rollback.

Layout of a store folder (default `adapters/`):

    manifest.json          ordered batches (with the SHA-256 of each file) and named profiles
    .lock                  held by every writer (filelock), so two processes never interleave
    <batch>/adapter_config.json, adapter_model.safetensors   a standard PEFT adapter
    <batch>/edit.json      requests, hyper-parameters, per-request results, created, base fingerprint
    <batch>/checksums.json SHA-256 of the three files above

A batch is written into a staging folder, fsynced, renamed into place, and only then listed in the
manifest (itself replaced atomically). A crash at any moment leaves either the complete batch or
none; an unlisted leftover folder is ignored and removed by `gc`.

A profile is an ordered list of batches: what one deployment serves. Rolling a batch back takes it
out of a profile (the files stay until `rm`/`gc`), so the model equals the stack without it, exactly.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock, Timeout

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .errors import IntegrityError, KdpoWarning, StoreError
from .fsutil import atomic_write_json, fsync_dir, fsync_tree, sha256_file
from .requests import EditRequest, request_from_dict

MANIFEST = "manifest.json"
EDIT_FILE = "edit.json"
CHECKSUMS = "checksums.json"
BATCH_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDIT_FILE)
DEFAULT_PROFILE = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
RESERVED_PREFIX = "kdpo_"  # in-memory adapters (folded stacks, squash output)
LOCK_TIMEOUT_S = 600.0


def check_name(name: str, what: str = "name") -> str:
    """Batch and profile names: letters, digits, '-' and '_' only (no '/', '..' or '.')."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise StoreError(f"invalid {what} {name!r}: use letters, digits, '-' and '_' (at most 100), "
                         f"starting with a letter or digit")
    if name.startswith(RESERVED_PREFIX):
        raise StoreError(f"invalid {what} {name!r}: names starting with {RESERVED_PREFIX!r} are reserved")
    return name


@dataclass(frozen=True)
class Batch:
    """One stored edit batch, as listed in the manifest."""

    name: str
    created: str
    fingerprint: str
    checksums: dict
    requests: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class AdapterStore:
    """A folder of edit batches and profiles. Reads need no lock; every write holds `.lock`."""

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            if not create:
                raise StoreError(f"no adapter store at {self.root} (it has no {MANIFEST}); make one by editing with "
                                 f"--store {self.root}")
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock():
                if not (self.root / MANIFEST).is_file():
                    atomic_write_json(self.root / MANIFEST, _empty_manifest())

    # ------------------------------------------------------------------ manifest

    def _lock(self) -> FileLock:
        return _TimedLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)

    def manifest(self) -> dict:
        try:
            data = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IntegrityError(f"{self.root / MANIFEST}: unreadable ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("batches"), list) or not isinstance(data.get("profiles"), dict):
            raise IntegrityError(f"{self.root / MANIFEST}: not a kdpo-lora manifest")
        return data

    def _save_manifest(self, data: dict) -> None:
        atomic_write_json(self.root / MANIFEST, data)

    def batches(self) -> list[Batch]:
        return [Batch(**entry) for entry in self.manifest()["batches"]]

    def batch(self, name: str) -> Batch:
        check_name(name, "batch name")
        for entry in self.batches():
            if entry.name == name:
                return entry
        raise StoreError(f"no batch {name!r} in {self.root}")

    def profiles(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.manifest()["profiles"].items()}

    def profile(self, name: str) -> list[str]:
        check_name(name, "profile name")
        profiles = self.profiles()
        if name not in profiles:
            raise StoreError(f"no profile {name!r} in {self.root} (profiles: {', '.join(profiles) or 'none'})")
        return profiles[name]

    def batch_dir(self, name: str) -> Path:
        """The folder of a batch, refusing anything that would leave the store (symlinks included)."""
        check_name(name, "batch name")
        path = self.root / name
        if path.is_symlink() or (path.exists() and not path.resolve().is_relative_to(self.root.resolve())):
            raise IntegrityError(f"{path}: is a link out of the store; refused")
        return path

    # ------------------------------------------------------------------ writing batches

    def add_batch(self, name: str, write_adapter, edit_record: dict, fingerprint: str,
                  profile: str = DEFAULT_PROFILE) -> Batch:
        """Store a batch: `write_adapter(folder)` writes the PEFT files; then list it in `profile`."""
        check_name(name, "batch name")
        check_name(profile, "profile name")
        with self._lock():
            manifest = self.manifest()
            if any(b["name"] == name for b in manifest["batches"]) or self.batch_dir(name).exists():
                raise StoreError(f"a batch named {name!r} already exists in {self.root}")
            staging = self.root / f".staging-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                write_adapter(staging)
                record = {**edit_record, "name": name, "created": _now(), "base_fingerprint": fingerprint}
                (staging / EDIT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str))
                checksums = {f: sha256_file(staging / f) for f in BATCH_FILES}
                (staging / CHECKSUMS).write_text(json.dumps(checksums, indent=2, sort_keys=True))
                fsync_tree(staging)
                staging.rename(self.root / name)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            entry = Batch(name, record["created"], fingerprint, checksums, len(record.get("requests", [])))
            manifest["batches"].append(entry.to_dict())
            manifest["profiles"].setdefault(profile, []).append(name)
            self._save_manifest(manifest)
            return entry

    def edit_record(self, name: str) -> dict:
        path = self.batch_dir(name) / EDIT_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IntegrityError(f"{path}: unreadable ({err})") from None

    def requests_of(self, name: str) -> list[EditRequest]:
        return [request_from_dict(r) for r in self.edit_record(name).get("requests", [])]

    # ------------------------------------------------------------------ profiles

    def rollback(self, batch: str, profile: str = DEFAULT_PROFILE) -> None:
        """Take `batch` out of `profile`; its files stay (use `apply` to put it back)."""
        check_name(batch, "batch name")
        self._edit_profile(profile, lambda names: _without(names, batch, profile))

    def apply(self, batch: str, profile: str = DEFAULT_PROFILE) -> None:
        """Put a stored batch (back) into `profile`, in its original order."""
        self.batch(batch)
        order = [b.name for b in self.batches()]

        def change(names: list[str]) -> list[str]:
            if batch in names:
                raise StoreError(f"batch {batch!r} is already in profile {profile!r}")
            return sorted(names + [batch], key=order.index)

        self._edit_profile(profile, change)

    def create_profile(self, name: str, batches: Iterable[str] = (), copy_from: str | None = None) -> None:
        check_name(name, "profile name")
        with self._lock():
            manifest = self.manifest()
            if name in manifest["profiles"]:
                raise StoreError(f"profile {name!r} already exists")
            known = {b["name"] for b in manifest["batches"]}
            names = list(manifest["profiles"][copy_from]) if copy_from else list(batches)
            if copy_from and copy_from not in manifest["profiles"]:
                raise StoreError(f"no profile {copy_from!r} to copy")
            unknown = [b for b in names if b not in known]
            if unknown:
                raise StoreError(f"unknown batch(es): {', '.join(unknown)}")
            manifest["profiles"][name] = names
            self._save_manifest(manifest)

    def remove_profile(self, name: str) -> None:
        check_name(name, "profile name")
        with self._lock():
            manifest = self.manifest()
            if name not in manifest["profiles"]:
                raise StoreError(f"no profile {name!r}")
            del manifest["profiles"][name]
            self._save_manifest(manifest)

    def _edit_profile(self, profile: str, change) -> None:
        check_name(profile, "profile name")
        with self._lock():
            manifest = self.manifest()
            if profile not in manifest["profiles"]:
                raise StoreError(f"no profile {profile!r}")
            manifest["profiles"][profile] = change(list(manifest["profiles"][profile]))
            self._save_manifest(manifest)

    # ------------------------------------------------------------------ removal

    def remove_batch(self, name: str, force: bool = False) -> None:
        """Delete a batch's files; refused while a profile uses it unless `force` (then it leaves them)."""
        self.batch(name)
        with self._lock():
            manifest = self.manifest()
            users = [p for p, names in manifest["profiles"].items() if name in names]
            if users and not force:
                raise StoreError(f"batch {name!r} is used by profile(s) {', '.join(users)}; roll it back first or use --force")
            for p in users:
                manifest["profiles"][p].remove(name)
            manifest["batches"] = [b for b in manifest["batches"] if b["name"] != name]
            self._save_manifest(manifest)  # unlisted first: a crash now leaves only an orphan for gc
            shutil.rmtree(self.batch_dir(name), ignore_errors=True)

    def gc(self) -> list[str]:
        """Remove folders the manifest does not list (interrupted writes); return their names."""
        removed = []
        with self._lock():
            listed = {b["name"] for b in self.manifest()["batches"]}
            for child in self.root.iterdir():
                if child.is_dir() and not child.is_symlink() and child.name not in listed:
                    shutil.rmtree(child)
                    removed.append(child.name)
        return removed

    # ------------------------------------------------------------------ integrity

    def verify_batch(self, name: str, fingerprint: str | None = None, hashes: bool = True) -> Path:
        """Check a batch before it is loaded: files, hashes (unless `hashes` is off: the quick check of a
        batch not loaded yet), safetensors only, base model. Returns its folder."""
        entry = self.batch(name)
        folder = self.batch_dir(name)
        if not folder.is_dir():
            raise IntegrityError(f"batch {name!r}: folder {folder} is missing")
        for child in folder.iterdir():
            if child.is_symlink():
                raise IntegrityError(f"batch {name!r}: {child.name} is a symbolic link; refused")
            if child.name not in BATCH_FILES + (CHECKSUMS,):
                raise IntegrityError(f"batch {name!r}: unexpected file {child.name} (only safetensors adapters are "
                                     f"loaded; pickles and other files are refused)")
        for file, expected in entry.checksums.items():
            path = folder / file
            if not path.is_file():
                raise IntegrityError(f"batch {name!r}: {file} is missing")
            if hashes and sha256_file(path) != expected:
                raise IntegrityError(f"batch {name!r}: {file} was modified (SHA-256 mismatch)")
        if fingerprint is not None and entry.fingerprint != fingerprint:
            raise IntegrityError(f"batch {name!r} was made for another base model (fingerprint "
                                 f"{entry.fingerprint[:12]} != {fingerprint[:12]})")
        return folder

    def verify(self, fingerprint: str | None = None) -> list[str]:
        """Every problem found in the store (empty when all is well)."""
        problems = []
        for entry in self.batches():
            try:
                self.verify_batch(entry.name, fingerprint)
            except IntegrityError as err:
                problems.append(str(err))
        listed = {b.name for b in self.batches()}
        for name, batches in self.profiles().items():
            missing = [b for b in batches if b not in listed]
            if missing:
                problems.append(f"profile {name!r} lists unknown batch(es) {', '.join(missing)}")
        return problems

    def superseded(self, requests: Iterable[EditRequest], profile: str,
                   requests_of: Callable[[str], list[EditRequest]] | None = None) -> dict[str, list[str]]:
        """For each request key already edited in `profile`: the batches that edited it (their requests
        read with `requests_of`, e.g. a cache of them, instead of from disk)."""
        keys = {r.key: r for r in requests}
        found: dict[str, list[str]] = {}
        if profile not in self.profiles():
            return found
        for name in self.profile(profile):
            for old in (requests_of or self.requests_of)(name):
                if old.key in keys:
                    found.setdefault(old.key, []).append(name)
        return found


class _TimedLock(FileLock):
    """A FileLock whose timeout is reported as a StoreError naming the store."""

    def __enter__(self):
        try:
            return super().__enter__()
        except Timeout:
            raise StoreError(f"the store is locked by another writer ({self.lock_file}); try again later") from None


def _without(names: list[str], batch: str, profile: str) -> list[str]:
    if batch not in names:
        raise StoreError(f"batch {batch!r} is not in profile {profile!r}")
    return [n for n in names if n != batch]


def _empty_manifest() -> dict:
    return {"format": "kdpo-lora-store", "version": 1, "batches": [], "profiles": {DEFAULT_PROFILE: []}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def warn_superseded(found: dict[str, list[str]]) -> None:
    for key, batches in found.items():
        warnings.warn(f"{key!r} was already edited by {', '.join(batches)}; the new edit supersedes it", KdpoWarning,
                      stacklevel=3)
