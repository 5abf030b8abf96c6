"""Edit requests and the readers for the common knowledge-editing file formats.

One dataclass (`EditRequest`) is the unit of work everywhere in the package. Readers accept:

- JSONL in the normalised schema of the project's data (one request per line);
- EasyEdit / KnowEdit JSON (a list of records with `prompt`, `target_new`, `ground_truth`, ...);
- ROME CounterFact JSON (`requested_rewrite` records);
- MEND zsRE JSON (`src`, `alt`, `rephrase`, `loc`, `loc_ans`).

A malformed file raises `RequestError` naming the file, the record (line for JSONL) and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import RequestError

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_TEXT_CHARS = 20_000


@dataclass(frozen=True)
class Probe:
    """A prompt with an expected answer: locality (must not change) or portability (must follow)."""

    prompt: str
    answer: str
    type: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: `prompt` should be continued by `target_new`. `aliases`: other names of the
    subject; the edit is trained and routed on them too."""

    prompt: str
    target_new: str
    subject: str | None = None
    aliases: tuple[str, ...] = ()
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    case_id: str | None = None

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt)
        _check_text("target_new", self.target_new)
        for name in ("subject", "target_true", "case_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RequestError(f"field '{name}': expected a string, got {type(value).__name__}")
        if self.target_new != self.target_new.strip():
            object.__setattr__(self, "target_new", self.target_new.strip())
        if not isinstance(self.aliases, (tuple, list)):
            raise RequestError(f"field 'aliases': expected a list of strings, got {type(self.aliases).__name__}")
        for alias in self.aliases:
            _check_text("aliases", alias)
        object.__setattr__(self, "aliases", tuple(dict.fromkeys(" ".join(a.split()) for a in self.aliases)))
        if self.aliases and not (self.subject and self.subject.strip()):
            raise RequestError("field 'aliases': other names of the subject need the subject")

    def with_alias(self, alias: str) -> str:
        """The prompt naming the subject (any case) by `alias`; as given if it does not name the subject."""
        if not self.subject:
            return self.prompt
        return re.sub(re.escape(self.subject.strip()), lambda _: alias, self.prompt, count=1, flags=re.IGNORECASE)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, in the normalised schema."""
        data = asdict(self)
        for key in ("aliases", "rephrase_prompts", "locality", "portability"):
            data[key] = list(data[key])
        for probes in (data["locality"], data["portability"]):
            for probe in probes:
                probe["aliases"] = list(probe["aliases"])
        return data

    @property
    def key(self) -> str:
        """What identifies the fact being edited (used to detect conflicting edits)."""
        return " ".join(self.prompt.split()).lower()


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(f"field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(f"field '{name}': must not be empty or whitespace")
    if len(value) > MAX_TEXT_CHARS:
        raise RequestError(f"field '{name}': {len(value)} characters is longer than {MAX_TEXT_CHARS}")
    if "\x00" in value:
        raise RequestError(f"field '{name}': contains a NUL character")


# --------------------------------------------------------------------------- field helpers


def _get(record: dict, name: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None):
    if name not in record or record[name] is None:
        if required:
            raise RequestError(f"missing field '{name}'")
        return default
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RequestError(f"field '{name}': expected {want}, got {type(value).__name__}")
    return value


def _str_list(record: dict, name: str) -> tuple[str, ...]:
    value = record.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"field '{name}': expected a list of strings")
    return tuple(v for v in value if v.strip())


def _probe(item: Any, where: str, default_type: str = "") -> Probe:
    if not isinstance(item, dict):
        raise RequestError(f"field '{where}': expected an object with 'prompt' and 'answer'")
    prompt = item.get("prompt")
    answer = item.get("answer", item.get("ground_truth"))
    if isinstance(answer, list):  # KnowEdit lists alternatives, sometimes nested
        flat = [a for a in _flatten(answer) if isinstance(a, str)]
        answer = flat[0] if flat else None
    if isinstance(prompt, list):  # KnowEdit sometimes lists several prompts; keep the first
        prompt = prompt[0] if prompt else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"field '{where}.prompt': expected a non-empty string")
    if not isinstance(answer, str) or not answer.strip():
        raise RequestError(f"field '{where}.answer': expected a non-empty string")
    aliases = item.get("aliases") or ()
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
        raise RequestError(f"field '{where}.aliases': expected a list of strings")
    kind = item.get("type", default_type)
    if not isinstance(kind, str):
        raise RequestError(f"field '{where}.type': expected a string")
    return Probe(prompt=prompt, answer=answer.strip(), type=kind, aliases=tuple(aliases))


def _flatten(items: Iterable) -> Iterable:
    for item in items:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _probe_list(record: dict, name: str) -> tuple[Probe, ...]:
    value = record.get(name)
    if value is None:
        return ()
    if isinstance(value, dict):  # KnowEdit: {"Reasoning": [{prompt, ground_truth}, ...], ...}
        probes = []
        for kind, items in value.items():
            items = items if isinstance(items, list) else [items]
            probes.extend(_probe(item, f"{name}.{kind}", kind) for item in items)
        return tuple(probes)
    if not isinstance(value, list):
        raise RequestError(f"field '{name}': expected a list of probes")
    return tuple(_probe(item, f"{name}[{i}]") for i, item in enumerate(value))


# --------------------------------------------------------------------------- record parsers


def from_schema(record: dict) -> EditRequest:
    """The project's normalised schema (also accepts EasyEdit/KnowEdit field names)."""
    rephrase = _str_list(record, "rephrase_prompts") or _str_list(record, "rephrase_prompt")
    locality = _probe_list(record, "locality")
    if not locality and "locality_prompt" in record:  # EasyEdit CounterFact flattening
        locality = (_probe({"prompt": record["locality_prompt"], "answer": record.get("locality_ground_truth")},
                           "locality_prompt", "neighborhood"),)
    target_true = record.get("target_true", record.get("ground_truth"))
    if isinstance(target_true, list):
        target_true = next((t for t in _flatten(target_true) if isinstance(t, str)), None)
    if target_true is not None and not isinstance(target_true, str):
        raise RequestError(f"field 'target_true': expected a string, got {type(target_true).__name__}")
    case_id = record.get("case_id")
    return EditRequest(
        prompt=_get(record, "prompt", str),
        target_new=_get(record, "target_new", str),
        subject=_get(record, "subject", str, required=False),
        aliases=_str_list(record, "aliases"),
        target_true=target_true,
        rephrase_prompts=rephrase,
        locality=locality,
        portability=_probe_list(record, "portability"),
        case_id=None if case_id is None else str(case_id),
    )


def from_counterfact(record: dict) -> EditRequest:
    """ROME's CounterFact record (`requested_rewrite` with a `{}` subject slot)."""
    rewrite = _get(record, "requested_rewrite", dict)
    template = _get(rewrite, "prompt", str)
    subject = _get(rewrite, "subject", str)
    if "{}" not in template:
        raise RequestError("field 'requested_rewrite.prompt': has no '{}' slot for the subject")
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise RequestError("field 'requested_rewrite.prompt': must have exactly one '{}' slot and no other braces")
    new = _get(rewrite, "target_new", dict)
    true = rewrite.get("target_true") or {}
    neighbours = _str_list(record, "neighborhood_prompts")
    true_str = true.get("str") if isinstance(true, dict) else None
    return EditRequest(
        prompt=template.replace("{}", subject),
        target_new=_get(new, "str", str),
        subject=subject,
        target_true=true_str,
        rephrase_prompts=_str_list(record, "paraphrase_prompts"),
        locality=tuple(Probe(p, true_str, "neighborhood") for p in neighbours) if true_str else (),
        case_id=str(record.get("case_id")) if record.get("case_id") is not None else None,
    )


def from_zsre(record: dict) -> EditRequest:
    """MEND's zsRE record (`src`, `alt`, `rephrase`, `loc`, `loc_ans`)."""
    answers = record.get("answers") or []
    loc = record.get("loc")
    locality = ()
    if loc is not None:
        locality = (_probe({"prompt": loc, "answer": record.get("loc_ans")}, "loc", "nq"),)
    return EditRequest(
        prompt=_get(record, "src", str),
        target_new=_get(record, "alt", str),
        subject=_get(record, "subject", str, required=False),
        target_true=answers[0] if answers and isinstance(answers[0], str) else None,
        rephrase_prompts=_str_list(record, "rephrase"),
        locality=locality,
        portability=_probe_list(record, "portability"),
        case_id=str(record["case_id"]) if record.get("case_id") is not None else None,
    )


def parse_record(record: Any) -> EditRequest:
    """Pick the parser from the record's fields."""
    if not isinstance(record, dict):
        raise RequestError(f"expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        return from_counterfact(record)
    if "src" in record and "alt" in record:
        return from_zsre(record)
    return from_schema(record)


# --------------------------------------------------------------------------- files


def read_requests(path: str | Path) -> list[EditRequest]:
    """Read every request of a `.jsonl` or `.json` file; errors name file, record and field."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{path}: no such request file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RequestError(f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} byte limit")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RequestError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    if path.suffix == ".jsonl":
        records = _jsonl_records(path, text)
    else:
        records = _json_records(path, text)
    requests = []
    for where, record in records:
        try:
            requests.append(parse_record(record))
        except RequestError as err:
            raise RequestError(f"{path}:{where}: {err}") from None
    if not requests:
        raise RequestError(f"{path}: contains no edit requests")
    return requests


def _jsonl_records(path: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except (ValueError, RecursionError) as err:
            raise RequestError(f"{path}:line {number}: invalid JSON ({_json_problem(err)})") from None
    return records


def _json_records(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"{path}:line {err.lineno}: invalid JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise RequestError(f"{path}: invalid JSON ({_json_problem(err)})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise RequestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {i}", record) for i, record in enumerate(data)]


def _json_problem(err: BaseException) -> str:
    """What is wrong with a JSON text, in a few words (the parser's own message where it has one)."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return " ".join(str(err).split())[:120]  # e.g. an integer of thousands of digits


def check_batch(requests: list[EditRequest]) -> None:
    """Refuse a batch that asks for the same prompt twice (the two edits would fight)."""
    if not requests:
        raise RequestError("no edit requests given")
    seen: dict[str, int] = {}
    for i, request in enumerate(requests):
        if request.key in seen:
            raise RequestError(f"requests {seen[request.key]} and {i} edit the same prompt: {request.prompt!r}")
        seen[request.key] = i


def write_requests(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as JSONL in the normalised schema."""
    with open(path, "w", encoding="utf-8") as handle:
        for request in requests:
            handle.write(json.dumps(request.to_dict(), ensure_ascii=False) + "\n")


def request_from_dict(data: dict) -> EditRequest:
    """Inverse of `EditRequest.to_dict` (used for requests stored in `edit.json`)."""
    return from_schema(data)


