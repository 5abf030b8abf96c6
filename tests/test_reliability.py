"""Reliability and security: hostile input, numerical faults, crashes, concurrent writers, write failures.

Every case checks the same invariant: the store is byte-for-byte unchanged (or, after a crash,
verifies, keeps every earlier batch intact, and holds the interrupted batch completely or not at all).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdpo_lora import objectives
from kdpo_lora.adapters import load_adapter
from kdpo_lora.cli import main
from kdpo_lora.errors import IntegrityError, NumericalError
from kdpo_lora.loading import load_model
from kdpo_lora.requests import EditRequest
from kdpo_lora.session import KnowledgeEditor
from kdpo_lora.store import AdapterStore

from conftest import UNROUTED, make_model

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--lr", "5e-3", "--beta", "1.0", "--cycles", "4", "--quiet", "--config", UNROUTED]
SETTINGS = {"learning_rate": 5e-3, "beta": 1.0, "cycles": 4}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a store (lock file aside) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture()
def store_with_batch(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), store, config=UNROUTED, overrides=SETTINGS)
    ke.edit([EditRequest("the capital of japan is", "rome")], name="b0", progress=False)
    return ke, store


def _write(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def hostile_inputs(tmp_path: Path, model_dir: Path) -> list[tuple[list[str], str]]:
    """(CLI arguments, expected words of the error) - files and flags a user or attacker might send."""
    long_prompt = " ".join(["the"] * 200)
    req = lambda **kw: json.dumps({"prompt": "the capital of spain is", "target_new": "paris", **kw})  # noqa: E731
    files = {
        "empty.jsonl": "",
        "blank-lines.jsonl": "\n\n  \n",
        "not-json.jsonl": "prompt: x\n",
        "truncated.jsonl": '{"prompt": "a", "target_new": "b"',
        "list.jsonl": "[1, 2, 3]\n",
        "number.json": "42",
        "missing-target.jsonl": json.dumps({"prompt": "the capital of spain is"}),
        "missing-prompt.jsonl": json.dumps({"target_new": "paris"}),
        "empty-target.jsonl": req(target_new=""),
        "space-target.jsonl": req(target_new="   \t "),
        "int-target.jsonl": req(target_new=7),
        "list-prompt.jsonl": req(prompt=["a", "b"]),
        "null-prompt.jsonl": req(prompt=None),
        "bool-subject.jsonl": req(subject=True),
        "nul-byte.jsonl": req(prompt="the capital\u0000 of spain is"),
        "bad-locality.jsonl": req(locality=[{"prompt": "x"}]),
        "bad-rephrase.jsonl": req(rephrase_prompts=[1, 2]),
        "duplicates.jsonl": req() + "\n" + req(target_new="rome") + "\n",
        "long-target.jsonl": req(target_new=" ".join(["rome"] * 80)),
        "long-prompt.jsonl": req(prompt=long_prompt),
        "huge-text.jsonl": req(prompt="x" * 30_000),
        "cf-no-slot.json": json.dumps([{"requested_rewrite": {"prompt": "no slot", "subject": "s",
                                                               "target_new": {"str": "x"}}}]),
        "zsre-bad-alt.json": json.dumps([{"src": "what is it?", "alt": 5}]),
    }
    paths = {name: _write(tmp_path, name, content) for name, content in files.items()}
    paths["bad-utf8.jsonl"] = _write(tmp_path, "bad-utf8.jsonl", b'{"prompt": "\xff\xfe", "target_new": "x"}\n')
    paths["unknown-key.yaml"] = _write(tmp_path, "unknown-key.yaml", "learning_rate: 1e-4\nlearnin_rate: 3\n")
    paths["bad.yaml"] = _write(tmp_path, "bad.yaml", "learning_rate: [1, 2\n")
    paths["nan.yaml"] = _write(tmp_path, "nan.yaml", "learning_rate: .nan\n")
    paths["independent.yaml"] = _write(tmp_path, "independent.yaml", "independent: maybe\n")
    paths["stop.yaml"] = _write(tmp_path, "stop.yaml", "stop: sometimes\n")
    paths["prefixes.yaml"] = _write(tmp_path, "prefixes.yaml", "context_prefixes: -3\n")
    paths["seq.yaml"] = _write(tmp_path, "seq.yaml", "sequential_lr_scale: 0\n")
    paths["rank.yaml"] = _write(tmp_path, "rank.yaml", "lora_rank: 2.5\n")
    paths["skip.yaml"] = _write(tmp_path, "skip.yaml", "skip_lower_layers: 1.5\n")
    model = ["--model", str(model_dir), "--quantization", "none"]
    edit = ["edit", *model, *FAST]
    cases = [([*edit, "--requests", paths[name]], words) for name, words in [
        ("empty.jsonl", "contains no edit requests"), ("blank-lines.jsonl", "contains no edit requests"),
        ("not-json.jsonl", "line 1: invalid JSON"), ("truncated.jsonl", "line 1: invalid JSON"),
        ("list.jsonl", "expected a JSON object"), ("number.json", "expected a JSON list"),
        ("missing-target.jsonl", "missing field 'target_new'"), ("missing-prompt.jsonl", "missing field 'prompt'"),
        ("empty-target.jsonl", "'target_new': must not be empty"), ("space-target.jsonl", "must not be empty"),
        ("int-target.jsonl", "'target_new': expected str"), ("list-prompt.jsonl", "'prompt': expected str"),
        ("null-prompt.jsonl", "missing field 'prompt'"), ("bool-subject.jsonl", "'subject': expected str"),
        ("nul-byte.jsonl", "NUL"), ("bad-locality.jsonl", "locality[0].answer"),
        ("bad-rephrase.jsonl", "rephrase_prompts"), ("duplicates.jsonl", "edit the same prompt"),
        ("long-target.jsonl", "over the limit of 64"), ("long-prompt.jsonl", "longer than the model's context"),
        ("huge-text.jsonl", "longer than 20000"), ("cf-no-slot.json", "no '{}' slot"),
        ("zsre-bad-alt.json", "'alt': expected str"), ("bad-utf8.jsonl", "not valid UTF-8"),
    ]]
    cases += [
        ([*edit, "--prompt", "the capital of spain is", "--target", ""], "must not be empty"),
        ([*edit, "--prompt", "the capital of spain is"], "give --prompt and --target"),
        ([*edit, "--prompt", "a", "--target", "b", "--requests", paths["empty.jsonl"]], "not both"),
        ([*edit, "--requests", str(tmp_path / "absent.jsonl")], "no such request file"),
        (["edit", *model, "--prompt", "the capital of spain is", "--target", "paris", "--lr", "1e30"], "learning_rate"),
        (["edit", *model, "--prompt", "the capital of spain is", "--target", "paris", "--lr", "nan"], "learning_rate"),
        (["edit", *model, "--prompt", "the capital of spain is", "--target", "paris", "--lr", "-1"], "learning_rate"),
        (["edit", *model, "--prompt", "the capital of spain is", "--target", "paris", "--cycles", "0"], "cycles"),
        (["edit", *model, "--prompt", "the capital of spain is", "--target", "paris", "--beta", "inf"], "beta"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["unknown-key.yaml"]], "unknown setting(s) learnin_rate"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["bad.yaml"]], "not valid YAML"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["nan.yaml"]], "learning_rate"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["independent.yaml"]], "independent: must be true or false"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["skip.yaml"]], "skip_lower_layers: must be a fraction"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["stop.yaml"]], "stop: 'sometimes' is not one of"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["prefixes.yaml"]],
         "context_prefixes: must be a non-negative integer"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["seq.yaml"]],
         "sequential_lr_scale: must be a finite positive number"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", paths["rank.yaml"]], "lora_rank: must be a positive integer"),
        ([*edit, "--prompt", "x", "--target", "y", "--config", str(tmp_path / "absent.yaml")], "no such config file"),
        (["edit", "--model", "no-such-model", "--prompt", "x", "--target", "y"], "unknown model"),
        (["edit", "--model", str(tmp_path / "m.gguf"), "--prompt", "x", "--target", "y"], "no such GGUF"),
        (["edit", "--model", str(model_dir), "--device", "tpu9", "--prompt", "x", "--target", "y"], "unknown device"),
        ([*edit, "--prompt", "x", "--target", "y", "--name", "../escape"], "invalid batch name"),
        ([*edit, "--prompt", "x", "--target", "y", "--name", "b0"], "already exists"),
        ([*edit, "--prompt", "x", "--target", "y", "--profile", "a/b"], "invalid profile name"),
        (["store", "rollback", "nope"], "is not in profile"),
        (["store", "rollback", "b0", "--profile", "nope"], "no profile 'nope'"),
        (["store", "apply", "b0"], "already in profile"),
        (["store", "show", "../../etc"], "invalid batch name"),
        (["store", "rm", "b0"], "used by profile"),
        (["store", "profile", "copy", "x"], "needs the profile to copy"),
        (["store", "profile", "create", "default"], "already exists"),
        (["store", "profile", "rm", "nope"], "no profile"),
        (["store", "ls", "--store", str(tmp_path / "missing-store")], "no adapter store"),
        (["generate", *model, "--prompt", "x", "--profile", "nope"], "no profile 'nope'"),
    ]
    return cases


def test_hostile_inputs_get_one_line_errors_and_leave_the_store_unchanged(store_with_batch, tmp_path,
                                                                          tiny_model_dir, capsys, monkeypatch):
    ke, store = store_with_batch
    before = snapshot(store)
    cases = hostile_inputs(tmp_path, tiny_model_dir)
    assert len(cases) >= 30
    for argv, words in cases:
        if argv[0] in ("edit", "store", "generate") and "--store" not in argv:
            argv = argv[:2] + ["--store", str(store)] + argv[2:] if argv[0] == "store" else argv + ["--store", str(store)]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, (argv, out, err)
        assert err.startswith("kdpo-lora: error:") and err.count("\n") == 1, (argv, err)
        assert words in err, (argv, err)
        assert snapshot(store) == before, argv
    # a file over the size limit (limit lowered so the test stays small)
    monkeypatch.setattr("kdpo_lora.requests.MAX_FILE_BYTES", 1000)
    big = _write(tmp_path, "big.jsonl", json.dumps({"prompt": "p", "target_new": "t"}) + "\n" + " " * 2000)
    assert main(["edit", "--model", str(tiny_model_dir), "--store", str(store), "--requests", big]) == 2
    assert "larger than the 1000 byte limit" in capsys.readouterr().err
    assert snapshot(store) == before
    (Path(tmp_path) / "record").write_text(str(len(cases) + 1))


def test_target_the_model_already_gives_is_refused(store_with_batch, capsys):
    ke, store = store_with_batch
    before = snapshot(store)
    answer = ke.generate(["the capital of spain is"], "default", max_new_tokens=1)[0].strip()
    code = main(["edit", "--model", str(ke.loaded.source), "--quantization", "none", "--store", str(store),
                 "--prompt", "the capital of spain is", "--target", answer, "--config", UNROUTED, "--quiet"])
    assert code == 2 and "already gives every target" in capsys.readouterr().err
    assert snapshot(store) == before


def test_nan_loss_aborts_without_writing(store_with_batch, monkeypatch):
    ke, store = store_with_batch
    before = snapshot(store)
    real = objectives.kdpo_loss

    def poisoned(*args, **kwargs):  # a real loss, turned NaN (as an overflow would)
        per_row, contributing = real(*args, **kwargs)
        return per_row * float("nan"), contributing

    monkeypatch.setattr(objectives, "kdpo_loss", poisoned)
    with pytest.raises(NumericalError, match="no adapter was written"):
        ke.edit([EditRequest("the official language of spain is", "german")], name="bad", progress=False)
    assert snapshot(store) == before
    assert ke.editor.stack == ["b0"] and "bad" not in ke.model.peft_config


def test_nan_gradient_aborts_without_writing(store_with_batch, monkeypatch):
    ke, store = store_with_batch
    before = snapshot(store)
    real_backward = torch.Tensor.backward

    def poisoned_backward(self, *args, **kwargs):
        real_backward(self, *args, **kwargs)
        for name, param in ke.model.named_parameters():
            if param.grad is not None:
                param.grad.fill_(float("inf"))

    monkeypatch.setattr(torch.Tensor, "backward", poisoned_backward)
    with pytest.raises(NumericalError, match="gradient"):
        ke.edit([EditRequest("the official language of spain is", "german")], name="bad", progress=False)
    assert snapshot(store) == before


@pytest.mark.parametrize("failing", ["fsync", "save_file", "manifest"])
def test_disk_full_during_save_leaves_the_store_as_it_was(store_with_batch, monkeypatch, failing):
    ke, store = store_with_batch
    before = snapshot(store)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"fsync": "kdpo_lora.store.fsync_tree", "save_file": "kdpo_lora.adapters.save_file",
              "manifest": "kdpo_lora.store.atomic_write_json"}[failing]
    monkeypatch.setattr(target, full)
    with pytest.raises(OSError, match="No space left"):
        ke.edit([EditRequest("the official language of spain is", "german")], name="late", progress=False)
    monkeypatch.undo()
    if failing == "manifest":  # the batch folder was complete but never listed: an orphan for gc
        assert AdapterStore(store).gc()["removed"] == ["late"]
    assert snapshot(store) == before
    assert AdapterStore(store).verify(ke.fingerprint) == []
    assert ke.editor.stack == ["b0"]


def test_read_only_store_reports_cleanly(store_with_batch, monkeypatch, capsys, tiny_model_dir):
    ke, store = store_with_batch
    before = snapshot(store)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(store))

    monkeypatch.setattr("kdpo_lora.store.Path.mkdir", denied)
    code = main(["edit", "--model", str(tiny_model_dir), "--quantization", "none", "--store", str(store),
                 "--prompt", "the official language of spain is", "--target", "german", *FAST])
    err = capsys.readouterr().err
    assert code == 1 and "Permission denied" in err and err.count("\n") == 1
    assert snapshot(store) == before


def test_pickles_and_foreign_files_are_refused(store_with_batch):
    ke, store = store_with_batch
    for planted in ("adapter_model.bin", "weights.pt"):
        path = AdapterStore(store).batch_dir("b0") / planted
        path.write_bytes(b"\x80\x04K\x01.")  # a pickle
        ke.use(None)
        with pytest.raises(IntegrityError, match="unexpected file"):
            ke.use("default")
        path.unlink()
    ke.use("default")


def test_adapter_whose_shapes_do_not_fit_is_refused(store_with_batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    ke, store = store_with_batch
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    other = LlamaForCausalLM(config)
    with pytest.raises(IntegrityError, match="shapes do not match"):
        load_adapter(other, "b0", AdapterStore(store).batch_dir("b0"))
    fewer_layers = make_model()
    fewer_layers.model.layers = fewer_layers.model.layers[:1]
    with pytest.raises(IntegrityError, match="do not fit this model"):
        load_adapter(fewer_layers, "b0", AdapterStore(store).batch_dir("b0"))


# --------------------------------------------------------------------------- crashes and concurrency


def _cli(args: list[str], crash_at: int = 0, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "CRASH_AT": str(crash_at), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_edit.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def _edit_args(model_dir: Path, store: Path, name: str, prompt: str = "the official language of spain is",
               target: str = "german") -> list[str]:
    return ["edit", "--model", str(model_dir), "--quantization", "none", "--store", str(store), "--prompt", prompt,
            "--target", target, "--name", name, *FAST]


def _check_after_crash(store: Path, fingerprint: str, earlier: dict[str, bytes], name: str) -> str:
    s = AdapterStore(store)
    assert s.verify(fingerprint) == []
    assert {k: v for k, v in snapshot(store).items() if k.startswith("b0/")} == earlier  # earlier batch intact
    listed = name in [b.name for b in s.batches()]
    if listed:
        assert name in s.profile("default")
        return "complete"
    assert name not in s.profile("default")
    return "absent"


@pytest.mark.slow
def test_kill_9_at_every_write_and_at_random_times(store_with_batch, tiny_model_dir, tmp_path):
    """SIGKILL at each file-system write of the save (deterministic points) and at random moments."""
    ke, store = store_with_batch
    earlier = {k: v for k, v in snapshot(store).items() if k.startswith("b0/")}
    probe = _cli(_edit_args(tiny_model_dir, store, "probe"))
    _, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err
    writes = int(err.strip().splitlines()[-1].split(": ")[1])
    AdapterStore(store).rollback("probe")
    outcomes = []
    for k in range(1, writes + 1):  # every write point of an edit + save
        proc = _cli(_edit_args(tiny_model_dir, store, f"k{k}"), crash_at=k)
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        outcomes.append(_check_after_crash(store, ke.fingerprint, earlier, f"k{k}"))
    rng = random.Random(0)
    for trial in range(max(0, 20 - writes)):  # random moments: loading, editing or saving
        proc = _cli(_edit_args(tiny_model_dir, store, f"r{trial}"))
        time.sleep(rng.uniform(0.5, 6.0))
        proc.kill()
        proc.communicate(timeout=60)
        outcomes.append(_check_after_crash(store, ke.fingerprint, earlier, f"r{trial}"))
    assert len(outcomes) >= 20 and "absent" in outcomes and "complete" in outcomes
    AdapterStore(store).gc()
    proc = _cli(_edit_args(tiny_model_dir, store, "after", "the capital of italy is", "oslo lisbon"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert AdapterStore(store).verify(ke.fingerprint) == []
    (tmp_path / "record").write_text(json.dumps({"trials": len(outcomes), "outcomes": outcomes}))


@pytest.mark.slow
def test_ctrl_c_stores_nothing_and_says_so(store_with_batch, tiny_model_dir):
    ke, store = store_with_batch
    before = snapshot(store)
    args = _edit_args(tiny_model_dir, store, "interrupted")
    args[args.index("--cycles") + 1] = "1000"  # long enough to be interrupted while editing
    args[args.index("--lr") + 1] = "1e-9"
    args.remove("--quiet")  # the progress bar says when the edit loop has started
    log = store.parent / "interrupted.err"
    with log.open("w") as err_file:
        proc = _cli(args, stderr=err_file)
        deadline = time.monotonic() + 300
        while "editing" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert snapshot(store) == before


@pytest.mark.slow
def test_two_writers_at_once_both_land(store_with_batch, tiny_model_dir):
    ke, store = store_with_batch
    procs = [_cli(_edit_args(tiny_model_dir, store, f"w{i}", p, t)) for i, (p, t) in
             enumerate([("the official language of spain is", "german"), ("the capital of italy is", "oslo lisbon"),
                        ("the eiffel tower is located in the city of", "thames river")])]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    s = AdapterStore(store)
    assert sorted(b.name for b in s.batches()) == ["b0", "w0", "w1", "w2"]
    assert sorted(s.profile("default")) == ["b0", "w0", "w1", "w2"]
    assert s.verify(ke.fingerprint) == []
