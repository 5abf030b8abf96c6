"""Store safety (issue 29): nothing of the user's is ever deleted, damaged stores are refused before
anything reads or writes them, concurrent edits of one fact end as if made one after the other, and
every bad input is a one-line error (exit 2) that leaves the store byte-for-byte as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdpo_lora.cli import main
from kdpo_lora.errors import IntegrityError, StoreError
from kdpo_lora.loading import load_model
from kdpo_lora.requests import EditRequest
from kdpo_lora.session import KnowledgeEditor
from kdpo_lora.store import AdapterStore
from kdpo_lora.fsutil import sha256_file

from conftest import UNROUTED

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--lr", "5e-3", "--beta", "1.0", "--cycles", "4", "--quiet"]
SETTINGS = {"learning_rate": 5e-3, "beta": 1.0, "cycles": 6}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.startswith("kdpo-lora: error:") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture()
def store(tiny_model_dir, tmp_path):
    """A store with batches b0 (default, staging) and b1 (default)."""
    root = tmp_path / "store"
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root, overrides=SETTINGS)
    ke.edit([EditRequest("the capital of japan is", "rome", subject="japan")], name="b0", progress=False)
    ke.edit([EditRequest("the capital of spain is", "oslo", subject="spain")], name="b1", progress=False)
    ke.store().create_profile("staging", ["b0"])
    return ke, root


# --------------------------------------------------------------------------- 1. data loss


def test_a_refused_edit_creates_nothing_and_gc_never_deletes_a_users_files(capsys, tiny_model_dir, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "data").mkdir()
    (proj / "data" / "results.csv").write_text("precious\n")
    before = snapshot(proj)
    model = ["--model", tiny_model_dir, "--quantization", "none"]
    code, _, err = cli(capsys, "edit", *model, *FAST, "--store", proj, "--prompt", "the capital of japan is",
                       "--target", "rome")  # routed by default: no subject, refused
    assert one_line_error(code, err) and "subject" in err
    assert sorted(p.name for p in proj.iterdir()) == ["data", "src"] and snapshot(proj) == before
    for argv in (["store", "gc", "--store", proj], ["store", "gc", "--dry-run", "--store", proj]):
        code, _, err = cli(capsys, *argv)
        assert one_line_error(code, err) and "no adapter store" in err
    assert snapshot(proj) == before and (proj / "src").is_dir()


def test_gc_removes_only_what_the_store_made_and_says_which(store, capsys):
    ke, root = store
    (root / "my-notes").mkdir()
    (root / "my-notes" / "todo.txt").write_text("keep me")
    (root / "README.txt").write_text("mine")
    (root / ".staging-half").mkdir()
    shutil.copytree(root / "b1", root / "orphan")
    AdapterStore(root).rollback("b1")  # now used by no profile
    dry = snapshot(root)
    code, out, _ = cli(capsys, "store", "gc", "--dry-run", "--store", root)
    assert code == 0 and snapshot(root) == dry
    assert "would remove b1 (batch no profile uses)" in out and "would remove orphan" in out
    assert "kept my-notes" in out and "kept README.txt" in out
    code, out, _ = cli(capsys, "store", "gc", "--store", root)
    assert code == 0 and "removed 3 item(s)" in out
    assert sorted(p.name for p in root.iterdir() if p.name != ".lock") == ["README.txt", "b0", "manifest.json",
                                                                          "my-notes"]
    assert (root / "my-notes" / "todo.txt").read_text() == "keep me"
    assert [b.name for b in AdapterStore(root).batches()] == ["b0"] and AdapterStore(root).verify() == []


def test_a_folder_without_the_store_marker_is_not_a_store(tmp_path, capsys):
    fake = tmp_path / "fake"
    (fake / "work").mkdir(parents=True)
    (fake / "manifest.json").write_text(json.dumps({"batches": [], "profiles": {"default": []}}))
    before = snapshot(fake)
    for argv in (["store", "gc"], ["store", "ls"], ["store", "verify"], ["store", "rollback", "x"]):
        code, _, err = cli(capsys, *argv, "--store", fake)
        assert one_line_error(code, err) and "not a kdpo-lora store manifest" in err, (argv, err)
    assert snapshot(fake) == before and (fake / "work").is_dir()


# --------------------------------------------------------------------------- 2. silent wrong answers


def test_generate_from_a_missing_store_profile_or_batch_is_an_error(store, capsys, tmp_path, tiny_model_dir):
    ke, root = store
    model = ["--model", tiny_model_dir, "--quantization", "none"]
    cases = [(["--store", tmp_path / "nowhere"], "no adapter store"),
             (["--store", root, "--profile", "ghost"], "no profile 'ghost'")]
    for extra, words in cases:
        code, out, err = cli(capsys, "generate", *model, "--prompt", "the capital of japan is", *extra)
        assert one_line_error(code, err) and words in err and "edited:" not in out
    shutil.rmtree(root / "b0")  # a batch the profile lists is gone
    code, out, err = cli(capsys, "generate", *model, "--store", root, "--prompt", "the capital of japan is")
    assert one_line_error(code, err) and "b0" in err and "missing" in err and "edited:" not in out


# --------------------------------------------------------------------------- 3. concurrent edits of one fact


def test_concurrent_edits_of_one_fact_end_as_if_made_one_after_the_other(tiny_model_dir, tmp_path):
    """B commits while A trains; A must then be trained again on top of B, record that it supersedes
    B, and win - the result of making them in sequence."""
    root = tmp_path / "store"
    first = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root, overrides=SETTINGS)
    other = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root, overrides=SETTINGS)
    prompt = "the capital of japan is"
    trained, real_edit = [], first.editor.edit

    def edit_while_another_writer_commits(*args, **kwargs):
        result = real_edit(*args, **kwargs)
        trained.append(kwargs.get("below"))
        if len(trained) == 1:  # the race: another process stores an edit of the same fact now
            other.edit([EditRequest(prompt, "lisbon", subject="japan")], name="race-b", progress=False)
        return result

    first.editor.edit = edit_while_another_writer_commits
    first.edit([EditRequest(prompt, "madrid", subject="japan")], name="race-a", progress=False)
    store = AdapterStore(root)
    assert store.profile("default") == ["race-b", "race-a"]
    assert trained == [[], ["race-b"]]  # trained twice: the second time on top of race-b
    assert store.edit_record("race-a")["supersedes"] == ["race-b"]
    assert first.generate([prompt], max_new_tokens=1) == ["madrid"]
    fresh = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root, overrides=SETTINGS)
    assert fresh.generate([prompt], max_new_tokens=1) == ["madrid"]


def test_concurrent_edits_of_other_subjects_are_not_retrained(tiny_model_dir, tmp_path):
    root = tmp_path / "store"
    first = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root, overrides=SETTINGS)
    other = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root, overrides=SETTINGS)
    calls, real_edit = [], first.editor.edit

    def edit(*args, **kwargs):
        calls.append(1)
        result = real_edit(*args, **kwargs)
        if len(calls) == 1:
            other.edit([EditRequest("the capital of spain is", "oslo", subject="spain")], name="b", progress=False)
        return result

    first.editor.edit = edit
    first.edit([EditRequest("the capital of japan is", "rome", subject="japan")], name="a", progress=False)
    assert len(calls) == 1 and AdapterStore(root).profile("default") == ["b", "a"]


@pytest.mark.slow
def test_two_cli_edits_of_one_fact_at_once_serve_the_one_stored_last(tiny_model_dir, tmp_path):
    root = tmp_path / "store"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "kdpo_lora.cli", "edit", "--model", str(tiny_model_dir), "--quantization", "none",
            "--store", str(root), *FAST, "--prompt", "the capital of japan is", "--subject", "japan"]
    procs = [subprocess.Popen(argv + ["--target", t, "--name", f"race-{t}"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in ("madrid", "lisbon")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    store = AdapterStore(root)
    first, last = store.profile("default")
    assert store.edit_record(last)["supersedes"] == [first]
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), root)
    assert ke.generate(["the capital of japan is"], max_new_tokens=1) == [last.removeprefix("race-")]


# --------------------------------------------------------------------------- 4. fail closed


def corruptions(manifest: dict) -> dict[str, str | None]:
    """Damaged manifests (text), each a way a store can be broken by hand, tool or attacker."""
    def variant(change) -> str:
        data = json.loads(json.dumps(manifest))
        change(data)
        return json.dumps(data)

    def entry(i: int, **kw):
        return lambda d: d["batches"][i].update(kw)

    return {
        "extra key": variant(lambda d: d.update(extra=1)),
        "missing key": variant(lambda d: d.pop("version")),
        "no format marker": variant(lambda d: d.pop("format") and d.update(formats="x")),
        "other version": variant(lambda d: d.update(version=3)),
        "serving missing a profile": variant(lambda d: d["serving"].pop("staging")),
        "serving unknown routing": variant(lambda d: d["serving"]["default"].update(routing="all")),
        "batch is a string": variant(lambda d: d["batches"].__setitem__(0, "b0")),
        "batch path escape": variant(entry(0, name="../../../etc")),
        "batch extra key": variant(entry(0, extra=True)),
        "batch missing key": variant(lambda d: d["batches"][0].pop("fingerprint")),
        "checksums not hex": variant(entry(0, checksums={"adapter_config.json": "x"})),
        "requests negative": variant(entry(0, requests=-1)),
        "batch listed twice": variant(lambda d: d["batches"].append(dict(d["batches"][0]))),
        "profile lists a batch twice": variant(lambda d: d["profiles"]["default"].append("b0")),
        "profile lists unknown batch": variant(lambda d: d["profiles"]["default"].append("ghost")),
        "profile is a string": variant(lambda d: d["profiles"].update(default="b0")),
        "profiles is a list": variant(lambda d: d.update(profiles=[])),
        "bad profile name": variant(lambda d: d["profiles"].update({"../x": []})),
        "not json": "{\"format\": ",
        "deeply nested": "[" * 100_000 + "]" * 100_000,
        "5000-digit integer": '{"version": ' + "9" * 5000 + "}",
        "empty file": "",
        "a list": "[]",
        "binary": "\x00\xff\xfe",
        "symlinked manifest": None,
    }


def commands(tmp_path: Path, model_dir: Path) -> list[list[str]]:
    model = ["--model", str(model_dir), "--quantization", "none"]
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "the capital of italy is", "target_new": "oslo", "subject": "italy"}))
    return [
        ["store", "ls"], ["store", "show", "b0"], ["store", "verify"], ["store", "gc"], ["store", "gc", "--dry-run"],
        ["store", "rollback", "b1"], ["store", "apply", "b1", "--profile", "staging"], ["store", "rm", "b1", "--force"],
        ["store", "profile", "create", "p2"], ["store", "profile", "copy", "p3", "default"],
        ["store", "profile", "rm", "staging"],
        ["edit", *model, *FAST, "--prompt", "the capital of italy is", "--target", "oslo", "--subject", "italy"],
        ["generate", *model, "--prompt", "the capital of japan is"],
        ["eval", *model, "--requests", str(requests), "--no-generation"],
        ["store", "squash", "default", "-o", str(tmp_path / "sq"), *model],
        ["store", "export", "default", "-o", str(tmp_path / "ex"), *model],
    ]


def with_store(argv: list[str], root: Path) -> list[str]:
    return argv[:2] + ["--store", str(root)] + argv[2:] if argv[0] == "store" else argv + ["--store", str(root)]


def test_every_command_refuses_a_damaged_store_and_leaves_it_byte_identical(store, tmp_path, tiny_model_dir, capsys):
    _, root = store
    good = json.loads((root / "manifest.json").read_text())
    cases = commands(tmp_path, tiny_model_dir)
    counted = 0
    for what, text in corruptions(good).items():
        manifest = root / "manifest.json"
        manifest.unlink()
        if text is None:
            real = tmp_path / "elsewhere.json"
            real.write_text(json.dumps(good))
            manifest.symlink_to(real)
        else:
            manifest.write_text(text)
        before = snapshot(root)
        for argv in cases:
            code, out, err = cli(capsys, *with_store(argv, root))
            assert one_line_error(code, err), (what, argv, out, err)
            assert "manifest.json" in err, (what, argv, err)
            assert snapshot(root) == before, (what, argv)
            assert not (tmp_path / "sq").exists() and not (tmp_path / "ex").exists()
            counted += 1
    manifest.unlink()
    manifest.write_text(json.dumps(good))
    assert AdapterStore(root).verify() == []
    (tmp_path / "record").write_text(str(counted))
    assert counted == len(cases) * len(corruptions(good)) >= 300


def test_verify_finds_a_pickle_with_updated_hashes_and_leftovers(store, capsys):
    ke, root = store
    weights = root / "b0" / "adapter_model.safetensors"
    weights.write_bytes(b"\x80\x04\x95" + b"\x00" * 64 + b".")  # a pickle where the safetensors file was
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["batches"][0]["checksums"]["adapter_model.safetensors"] = sha256_file(weights)
    (root / "manifest.json").write_text(json.dumps(manifest))
    checksums = json.loads((root / "b0" / "checksums.json").read_text())
    checksums["adapter_model.safetensors"] = sha256_file(weights)
    (root / "b0" / "checksums.json").write_text(json.dumps(checksums))
    (root / ".staging-b9").mkdir()
    code, out, err = cli(capsys, "store", "verify", "--store", root)
    assert code == 2 and "not a safetensors file" in out and "leftover: .staging-b9" in out
    ke.use(None)
    with pytest.raises(IntegrityError, match="not a safetensors file"):
        ke.generate(["the capital of japan is"], "staging", max_new_tokens=1)


def test_a_profile_cannot_list_a_batch_twice(store):
    _, root = store
    with pytest.raises(StoreError, match="more than once"):
        AdapterStore(root).create_profile("p", ["b0", "b0"])
    with pytest.raises(StoreError, match="already in profile"):
        AdapterStore(root).apply("b0", "staging")


# --------------------------------------------------------------------------- 5. tracebacks


def test_inputs_that_used_to_end_in_a_traceback(store, tmp_path, tiny_model_dir, capsys, monkeypatch):
    ke, root = store
    model = ["--model", str(tiny_model_dir), "--quantization", "none", "--store", str(root)]
    files = {
        "nested.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
        "nested.json": "[" * 100_000 + "]" * 100_000,
        "digits.jsonl": '{"prompt": "the capital of italy is", "target_new": "oslo", "case_id": ' + "7" * 5000 + "}\n",
        "cf-mixed.json": json.dumps([{"requested_rewrite": {"prompt": "{} is in {0}", "subject": "rome",
                                                            "target_new": {"str": "x"}}}]),
    }
    before = snapshot(root)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        code, _, err = cli(capsys, "edit", *model, *FAST, "--requests", tmp_path / name)
        assert one_line_error(code, err), (name, err)
    gen = ["generate", *model]
    cases = [
        (["store", "profile", "copy", "x", "ghost", "--store", root], "no profile 'ghost' to copy"),
        ([*gen, "--prompt", "the capital of japan is", "--max-new-tokens", "0"], "--max-new-tokens"),
        ([*gen, "--prompt", "the capital of japan is", "--max-new-tokens", "-5"], "--max-new-tokens"),
        ([*gen, "--prompt", ""], "must not be empty"),
        ([*gen, "--prompt", " ".join(["the"] * 200)], "longer than the model's context"),
    ]
    for argv, words in cases:
        code, _, err = cli(capsys, *argv)
        assert one_line_error(code, err) and words in err, (argv, err)
    assert snapshot(root) == before


def test_a_read_only_store_is_refused_before_training(store, tiny_model_dir, capsys, monkeypatch):
    ke, root = store
    before = snapshot(root)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained before finding out the store is read-only")

    monkeypatch.setattr("kdpo_lora.store.tempfile.TemporaryFile", denied)
    monkeypatch.setattr("kdpo_lora.editor.Editor.edit", must_not_train)
    code, _, err = cli(capsys, "edit", "--model", tiny_model_dir, "--quantization", "none", "--store", root, *FAST,
                       "--prompt", "the capital of italy is", "--target", "oslo", "--subject", "italy")
    assert one_line_error(code, err) and "not writable" in err
    assert snapshot(root) == before


# --------------------------------------------------------------------------- 6. exports that hold where served


def test_export_names_the_true_base_loads_offline_and_reports_edits_that_do_not_hold(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "nf4", "cpu"), tmp_path / "store", config=UNROUTED,
                         overrides=SETTINGS)
    facts = [("the eiffel tower is located in the city of", "rome"), ("the capital of japan is", "paris"),
             ("the official language of spain is", "german")]
    for i, (prompt, target) in enumerate(facts):
        ke.edit([EditRequest(prompt, target)], name=f"b{i}", progress=False)
    report = ke.export("default", tmp_path / "fp32", target="fp32")
    record = json.loads((tmp_path / "fp32" / "kdpo_export.json").read_text())
    config = json.loads((tmp_path / "fp32" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve()) == record["base_model"]
    assert record["base_fingerprint"] == ke.fingerprint and record["for"] == "fp32" and record["edits"] == 3
    # the consumer's path, offline: the adapter folder alone names a base that loads
    served = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "fp32")).eval()
    encoded = ke.loaded.tokenizer([p for p, _ in facts], return_tensors="pt", padding=True)
    with torch.no_grad():
        answers = served(**encoded).logits[:, -1].argmax(-1)
    firsts = [ke.loaded.tokenizer(t, add_special_tokens=False).input_ids[0] for _, t in facts]
    failing = sorted(p for (p, _), a, f in zip(facts, answers.tolist(), firsts) if a != f)
    assert sorted(record["not_holding"]) == sorted(report["not_holding"])
    assert set(failing) <= set(record["not_holding"])  # single-token targets: the same judgement
    # an export that truly loses edits (rank 1 of 3 edits) says which, with a warning
    with pytest.warns(UserWarning, match="edits do not hold on the nf4 base"):
        lossy = ke.export("default", tmp_path / "rank1", max_rank=1, compress=True, target="nf4")
    assert lossy["not_holding"] and set(lossy["not_holding"]) <= {p for p, _ in facts}


def test_export_command_checks_the_target_precision(store, tmp_path, tiny_model_dir, capsys):
    _, root = store
    code, out, err = cli(capsys, "store", "export", "default", "-o", tmp_path / "bf16", "--for", "bf16",
                         "--model", tiny_model_dir, "--quantization", "none", "--store", root)
    assert code == 0, err
    assert "checked on the bf16 base with plain peft:" in out and "of 2 edits hold" in out
    assert json.loads((tmp_path / "bf16" / "kdpo_export.json").read_text())["for"] == "bf16"
