"""The adapter store: one folder per edit batch, a manifest of batches and profiles, exact rollback.

Layout of a store folder (default `adapters/`):

    manifest.json          ordered batches (with the SHA-256 of each file), named profiles, and how each
                           profile is served (its routing: every reader honours it)
    .lock                  held by every writer (filelock), so two processes never interleave
    <batch>/adapter_config.json, adapter_model.safetensors   a standard PEFT adapter
    <batch>/edit.json      requests, hyper-parameters, per-request results, created, base fingerprint
    <batch>/checksums.json SHA-256 of the three files above

A batch is written into a staging folder, fsynced, renamed into place, and only then listed in the
manifest (itself replaced atomically). A crash at any moment leaves either the complete batch or
none; a leftover staging or unlisted batch folder is ignored and removed by `gc`.

A folder is a store only if its manifest carries the store's own marker (`format`, `version`); every
command validates the whole manifest before it reads or writes, so a damaged store is refused, never
rewritten. Nothing is created in a folder until the first batch is stored there, and `gc` removes
only what the store itself made.

A profile is an ordered list of batches: what one deployment serves. Rolling a batch back takes it
out of a profile (the files stay until `rm`/`gc`), so the model equals the stack without it, exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from filelock import FileLock, Timeout
from safetensors import safe_open

from .config import DEFAULT_ROUTING, ROUTINGS
from .errors import IntegrityError, KdpoWarning, StoreError
from .fsutil import atomic_write_json, fsync_dir, fsync_tree, sha256_file
from .requests import EditRequest, request_from_dict

ADAPTER_CONFIG = "adapter_config.json"  # a batch folder is a standard PEFT adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
AUDIT_LOG = "audit.jsonl"  # what the server's admin API did to the store, one JSON line per action
EDIT_FILE = "edit.json"
CHECKSUMS = "checksums.json"
BATCH_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDIT_FILE)
DEFAULT_PROFILE = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
RESERVED_PREFIX = "kdpo_"  # in-memory adapters (folded stacks, squash output)
LOCK_TIMEOUT_S = 600.0
STORE_FORMAT, STORE_VERSION = "kdpo-lora-store", 2
MANIFEST_KEYS = {"format", "version", "batches", "profiles", "serving"}

BATCH_KEYS = {"name", "created", "fingerprint", "checksums", "requests"}
STAGING_PREFIX = ".staging-"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ProfileChanged(StoreError):
    """The profile a batch was trained on changed, in a way that matters to it, before it was stored."""


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
        """Open the store at `root`; with `create`, one that does not exist yet is fine: it is made
        (folder and manifest) only when its first batch is stored."""
        self.root = Path(root)
        if not self.exists():
            if not create:
                raise StoreError(f"no adapter store at {self.root} (it has no {MANIFEST}); make one by editing with "
                                 f"--store {self.root}")
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"{self.root} is a file, not a folder; choose another --store")
        else:
            self.manifest()  # fail closed: a damaged store is refused before anything reads or writes it

    def exists(self) -> bool:
        return (self.root / MANIFEST).exists() or (self.root / MANIFEST).is_symlink()

    # ------------------------------------------------------------------ manifest

    def _lock(self) -> FileLock:
        return _TimedLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)

    def _write_lock(self) -> FileLock:
        """The lock, for a change to a store that must already exist."""
        if not self.exists():
            raise StoreError(f"no adapter store at {self.root} (it has no {MANIFEST})")
        return self._lock()

    def manifest(self) -> dict:
        """The manifest, validated whole (an empty one for a store not created yet)."""
        path = self.root / MANIFEST
        if path.is_symlink():
            raise IntegrityError(f"{path}: is a symbolic link; refused")
        if not path.exists():
            return _empty_manifest()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise IntegrityError(f"{path}: unreadable ({_first_line(err)})") from None
        if isinstance(data, dict) and data.get("format") == STORE_FORMAT and data.get("version") == 1:
            data = self._from_version_1(data, str(path))
        validate_manifest(data, str(path))
        return data

    def _from_version_1(self, data: dict, where: str) -> dict:
        """A version-1 manifest as version 2 (written as such by the next write): each profile is served
        with the routing its batches were made with (version 1 took it from whoever opened the store)."""
        validate_manifest({**data, "version": STORE_VERSION, "serving": {p: {"routing": DEFAULT_ROUTING}
                                                                       for p in data.get("profiles", {})}}, where)
        serving = {}
        for profile, names in data["profiles"].items():
            routing = self.edit_record(names[0]).get("config", {}).get("routing", "none") if names else DEFAULT_ROUTING
            serving[profile] = {"routing": routing if routing in ROUTINGS else "none"}
        return {**data, "version": STORE_VERSION, "serving": serving}

    def routing(self, profile: str) -> str | None:
        """How `profile` is served (None: no such profile yet)."""
        entry = self.manifest()["serving"].get(profile)
        return None if entry is None else entry["routing"]

    def check_writable(self) -> None:
        """Refuse, before any work, a store (or the folder it would be made in) that cannot be written."""
        folder = self.root
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise StoreError(f"cannot make an adapter store at {self.root}: {folder} is not a folder")
        try:
            with tempfile.TemporaryFile(dir=folder, prefix=".kdpo-write-check-"):
                pass
        except OSError as err:
            raise StoreError(f"the adapter store {self.root} is not writable ({err.strerror or err})") from None
        if (self.root / MANIFEST).exists() and not os.access(self.root / MANIFEST, os.R_OK):
            raise StoreError(f"{self.root / MANIFEST} is not readable")

    def _save_manifest(self, data: dict) -> None:
        atomic_write_json(self.root / MANIFEST, data)

    def batches(self) -> list[Batch]:
        return [Batch(**entry) for entry in self.manifest()["batches"]]

    def users(self, batch: str) -> list[str]:
        """The profiles that serve `batch`."""
        return [p for p, names in self.profiles().items() if batch in names]

    def batch(self, name: str) -> Batch:
        check_name(name, "batch name")
        for entry in self.batches():
            if entry.name == name:
                return entry
        raise StoreError(f"no batch {name!r} in {self.root}")

    def profiles(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.manifest()["profiles"].items()}

    def profile(self, name: str) -> list[str]:
        return self.listing(name)[0]

    def listing(self, name: str) -> tuple[list[str], str]:
        """A profile's batches and how it is served, from one read of the manifest."""
        check_name(name, "profile name")
        manifest = self.manifest()
        if name not in manifest["profiles"]:
            raise StoreError(f"no profile {name!r} in {self.root} (profiles: {', '.join(manifest['profiles']) or 'none'})")
        return list(manifest["profiles"][name]), manifest["serving"][name]["routing"]

    def batch_dir(self, name: str) -> Path:
        """The folder of a batch, refusing anything that would leave the store (symlinks included)."""
        check_name(name, "batch name")
        path = self.root / name
        if path.is_symlink() or (path.exists() and not path.resolve().is_relative_to(self.root.resolve())):
            raise IntegrityError(f"{path}: is a link out of the store; refused")
        return path

    # ------------------------------------------------------------------ writing batches

    def add_batch(self, name: str, write_adapter, edit_record: dict, fingerprint: str,
                  profile: str = DEFAULT_PROFILE, on_commit: Callable[[dict], dict] | None = None,
                  routing: str = DEFAULT_ROUTING) -> Batch:
        """Store a batch: `write_adapter(folder)` writes the PEFT files; then list it in `profile`.

        `on_commit(manifest)` runs under the store's lock, before anything is written: it may raise
        `ProfileChanged` (nothing is stored) or return fields to add to the batch's record (what it
        supersedes, judged against the profile as it is now, not as it was when training began).
        """
        check_name(name, "batch name")
        check_name(profile, "profile name")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            manifest = self.manifest()
            if any(b["name"] == name for b in manifest["batches"]) or self.batch_dir(name).exists():
                raise StoreError(f"a batch named {name!r} already exists in {self.root}")
            _check_routing(manifest, profile, routing)
            extra = on_commit(manifest) if on_commit is not None else {}
            staging = self.root / f"{STAGING_PREFIX}{name}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                write_adapter(staging)
                record = {**edit_record, **extra, "name": name, "created": _now(), "base_fingerprint": fingerprint}
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
            if not manifest["profiles"].get(profile):  # a new or empty profile is served as its first batch is
                manifest["serving"][profile] = {"routing": routing}
            manifest["profiles"].setdefault(profile, []).append(name)
            self._save_manifest(manifest)
            return entry

    def edit_record(self, name: str) -> dict:
        path = self.batch_dir(name) / EDIT_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise IntegrityError(f"{path}: unreadable ({_first_line(err)})") from None

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

    def create_profile(self, name: str, batches: Iterable[str] = (), copy_from: str | None = None,
                       routing: str | None = None) -> None:
        """A new profile: a copy of `copy_from` (its batches and routing), or `batches` served with
        `routing` (default: the routing they were made with; subject for an empty profile)."""
        check_name(name, "profile name")
        if routing is not None and routing not in ROUTINGS:
            raise StoreError(f"routing {routing!r} is not one of {', '.join(ROUTINGS)}")
        with self._write_lock():
            manifest = self.manifest()
            if name in manifest["profiles"]:
                raise StoreError(f"profile {name!r} already exists")
            if copy_from is not None and copy_from not in manifest["profiles"]:
                raise StoreError(f"no profile {copy_from!r} to copy (profiles: {', '.join(manifest['profiles'])})")
            known = {b["name"] for b in manifest["batches"]}
            names = list(manifest["profiles"][copy_from]) if copy_from is not None else list(batches)
            problem = _listing_problem(names, known)
            if problem:
                raise StoreError(f"profile {name!r}: {problem}")
            if routing is None:
                routing = manifest["serving"][copy_from]["routing"] if copy_from is not None else self._made_with(names)
            manifest["profiles"][name] = names
            manifest["serving"][name] = {"routing": routing}
            self._save_manifest(manifest)

    def _made_with(self, batches: list[str]) -> str:
        """The routing `batches` were trained for (as their records say)."""
        made = {self.edit_record(b).get("config", {}).get("routing", "none") for b in batches}
        if len(made) > 1:
            raise StoreError(f"the batches were made with different routings ({', '.join(sorted(made))}); "
                             f"say which the profile serves with (--routing)")
        return made.pop() if made else DEFAULT_ROUTING

    def remove_profile(self, name: str) -> None:
        check_name(name, "profile name")
        with self._write_lock():
            manifest = self.manifest()
            if name not in manifest["profiles"]:
                raise StoreError(f"no profile {name!r}")
            del manifest["profiles"][name]
            del manifest["serving"][name]
            self._save_manifest(manifest)

    def _edit_profile(self, profile: str, change) -> None:
        check_name(profile, "profile name")
        with self._write_lock():
            manifest = self.manifest()
            if profile not in manifest["profiles"]:
                raise StoreError(f"no profile {profile!r}")
            manifest["profiles"][profile] = change(list(manifest["profiles"][profile]))
            self._save_manifest(manifest)

    # ------------------------------------------------------------------ removal

    def remove_batch(self, name: str, force: bool = False) -> None:
        """Delete a batch's files; refused while a profile uses it unless `force` (then it leaves them)."""
        self.batch(name)
        with self._write_lock():
            manifest = self.manifest()
            users = [p for p, names in manifest["profiles"].items() if name in names]
            if users and not force:
                raise StoreError(f"batch {name!r} is used by profile(s) {', '.join(users)}; roll it back first or use --force")
            for p in users:
                manifest["profiles"][p].remove(name)
            manifest["batches"] = [b for b in manifest["batches"] if b["name"] != name]
            self._save_manifest(manifest)  # unlisted first: a crash now leaves only an orphan for gc
            shutil.rmtree(self.batch_dir(name), ignore_errors=True)

    def gc(self, dry_run: bool = False) -> dict[str, list[str]]:
        """Remove what the store made and no longer needs: leftover staging folders and temporary
        files of interrupted writes, batch folders the manifest does not list, and listed batches no
        profile uses. Anything else in the folder (a user's files) is left alone and reported.
        Returns {"removed": [...], "unused": [...] (listed batches among them), "left": [...]}."""
        with self._write_lock():
            manifest = self.manifest()
            listed = {b["name"] for b in manifest["batches"]}
            used = {n for names in manifest["profiles"].values() for n in names}
            unused = sorted(listed - used)
            removed, left = [], []
            for child in sorted(self.root.iterdir()):
                name = child.name
                if name in (MANIFEST, ".lock", AUDIT_LOG) or (name in listed and name not in unused):
                    continue
                if name in unused or _made_by_store(child):
                    removed.append(name)
                else:
                    left.append(name)
            if not dry_run:
                if unused:
                    manifest["batches"] = [b for b in manifest["batches"] if b["name"] not in unused]
                    self._save_manifest(manifest)  # unlisted first: a crash now leaves only orphans
                for name in removed:
                    path = self.root / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return {"removed": removed, "unused": unused, "left": left}

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
        if hashes and not is_safetensors(folder / ADAPTER_WEIGHTS):
            raise IntegrityError(f"batch {name!r}: {ADAPTER_WEIGHTS} is not a safetensors file (refused: only "
                                 "safetensors are loaded)")
        if fingerprint is not None and entry.fingerprint != fingerprint:
            raise IntegrityError(f"batch {name!r} was made for another base model (fingerprint "
                                 f"{entry.fingerprint[:12]} != {fingerprint[:12]})")
        return folder

    def verify(self, fingerprint: str | None = None) -> list[str]:
        """Every problem found in the store (empty when all is well)."""
        try:
            batches = self.batches()
        except StoreError as err:
            return [str(err)]
        problems = []
        for entry in batches:
            try:
                self.verify_batch(entry.name, fingerprint)
            except IntegrityError as err:
                problems.append(str(err))
        return problems

    def leftovers(self) -> list[str]:
        """What interrupted writes left in the folder (harmless, never read; `gc` removes them)."""
        if not self.root.is_dir():
            return []
        listed = {b.name for b in self.batches()}
        return [child.name for child in sorted(self.root.iterdir()) if child.name not in listed and _made_by_store(child)]

    def superseded(self, requests: Iterable[EditRequest], names: Sequence[str],
                   requests_of: Callable[[str], list[EditRequest]] | None = None) -> dict[str, list[str]]:
        """For each request key already edited by one of the batches `names`: the batches that edited
        it (their requests read with `requests_of`, e.g. a cache of them, instead of from disk)."""
        keys = {r.key for r in requests}
        found: dict[str, list[str]] = {}
        for name in names:
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
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "batches": [], "profiles": {DEFAULT_PROFILE: []},
            "serving": {DEFAULT_PROFILE: {"routing": DEFAULT_ROUTING}}}


def _check_routing(manifest: dict, profile: str, routing: str) -> None:
    stored = manifest["serving"].get(profile, {}).get("routing")
    if manifest["profiles"].get(profile) and stored != routing:
        raise StoreError(f"profile {profile!r} is served with routing {stored!r} (stored with it); a batch made "
                         f"with routing {routing!r} cannot join it: edit another profile, or drop --routing")


def validate_manifest(data: object, where: str) -> None:
    """Refuse any manifest this code did not write, naming the first bad entry (fail closed)."""
    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{where}: {what}; the store is damaged, nothing was read or written")

    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise bad(f"not a kdpo-lora store manifest (no \"format\": \"{STORE_FORMAT}\")")
    if data.get("version") != STORE_VERSION:
        raise bad(f"store version {data.get('version')!r} is not {STORE_VERSION}, the one this kdpo-lora reads")
    if set(data) != MANIFEST_KEYS:
        raise bad(f"keys {sorted(map(str, data))} are not {sorted(MANIFEST_KEYS)}")
    if not isinstance(data["batches"], list) or not isinstance(data["profiles"], dict):
        raise bad("'batches' must be a list and 'profiles' a mapping")
    names: set[str] = set()
    for i, entry in enumerate(data["batches"]):
        label = f"batch entry {i}"
        if not isinstance(entry, dict) or set(entry) != BATCH_KEYS:
            raise bad(f"{label} is not an object with exactly the keys {', '.join(sorted(BATCH_KEYS))}")
        name = entry["name"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.startswith(RESERVED_PREFIX):
            raise bad(f"{label} has an invalid name {name!r}")
        if name in names:
            raise bad(f"batch {name!r} is listed twice")
        names.add(name)
        if not isinstance(entry["created"], str) or not isinstance(entry["fingerprint"], str):
            raise bad(f"batch {name!r}: 'created' and 'fingerprint' must be strings")
        if isinstance(entry["requests"], bool) or not isinstance(entry["requests"], int) or entry["requests"] < 0:
            raise bad(f"batch {name!r}: 'requests' must be a count")
        sums = entry["checksums"]
        if not isinstance(sums, dict) or set(sums) != set(BATCH_FILES) or not all(
                isinstance(v, str) and HEX64.match(v) for v in sums.values()):
            raise bad(f"batch {name!r}: 'checksums' must give the SHA-256 of {', '.join(BATCH_FILES)}")
    for profile, batches in data["profiles"].items():
        if not NAME_PATTERN.match(profile) or profile.startswith(RESERVED_PREFIX):
            raise bad(f"invalid profile name {profile!r}")
        if not isinstance(batches, list) or not all(isinstance(b, str) for b in batches):
            raise bad(f"profile {profile!r} must be a list of batch names")
        problem = _listing_problem(batches, names)
        if problem:
            raise bad(f"profile {profile!r}: {problem}")
    serving = data["serving"]
    if not isinstance(serving, dict) or set(serving) != set(data["profiles"]):
        raise bad("'serving' must name how each profile is served, and only those")
    for profile, entry in serving.items():
        if not isinstance(entry, dict) or set(entry) != {"routing"} or entry["routing"] not in ROUTINGS:
            raise bad(f"profile {profile!r} is served with {entry!r}; expected {{\"routing\": one of "
                      f"{', '.join(ROUTINGS)}}}")


def _listing_problem(batches: list[str], known: set[str]) -> str | None:
    """What is wrong with a profile's list of batches: unknown ones, or one listed twice (served twice)."""
    unknown = [b for b in batches if b not in known]
    if unknown:
        return f"unknown batch(es) {', '.join(map(repr, unknown))}"
    twice = sorted({b for b in batches if batches.count(b) > 1})
    return f"lists batch(es) {', '.join(map(repr, twice))} more than once" if twice else None


def is_safetensors(path: Path) -> bool:
    """A well-formed safetensors file (header parsed, tensors within the file), read without loading it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means "not safetensors"
        return False


def _made_by_store(path: Path) -> bool:
    """A leftover of one of the store's own writes: a staging folder, a temporary manifest, or an
    unlisted batch folder holding exactly a batch's files."""
    name = path.name
    if path.is_symlink():
        return False
    if path.is_dir() and name.startswith(STAGING_PREFIX):
        return True
    if path.is_file() and (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")
                           or name.startswith(".kdpo-write-check-")):
        return True
    if path.is_dir() and NAME_PATTERN.match(name):
        return {c.name for c in path.iterdir()} == set(BATCH_FILES) | {CHECKSUMS}
    return False


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def warn_superseded(found: dict[str, list[str]]) -> None:
    for key, batches in found.items():
        warnings.warn(f"{key!r} was already edited by {', '.join(batches)}; the new edit supersedes it", KdpoWarning,
                      stacklevel=3)
