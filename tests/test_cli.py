"""The command line on the tiny model: edit, generate, store verbs, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdpo_lora.cli import main
from kdpo_lora.errors import KdpoWarning

FAST = ["--lr", "5e-3", "--beta", "1.0", "--cycles", "10", "--rank", "8", "--quiet"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_edit_generate_and_store_verbs(capsys, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    model = ["--model", tiny_model_dir, "--quantization", "none", "--store", store]
    code, out, err = run(capsys, "edit", *model, *FAST, "--prompt", "the capital of japan is", "--target", "rome",
                         "--subject", "japan", "--name", "b1")
    assert code == 0, err
    assert "stored batch b1" in out and out.splitlines()[0].split()[0] == "ok"
    code, out, _ = run(capsys, "generate", *model, "--prompt", "the capital of japan is", "--compare",
                       "--max-new-tokens", "1")
    assert code == 0 and "edited: 'rome'" in out and "base  :" in out
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "the official language of spain is", "target_new": "german",
                                    "subject": "spain"}) + "\n")
    assert run(capsys, "edit", *model, *FAST, "--requests", requests, "--name", "b2")[0] == 0
    code, out, _ = run(capsys, "store", "ls", "--store", store)
    assert "b1" in out and "profile default: b1 b2" in out
    assert run(capsys, "store", "show", "b1", "--store", store)[1].count("rome") >= 1
    assert run(capsys, "store", "rollback", "b2", "--store", store)[0] == 0
    code, out, _ = run(capsys, "generate", *model, "--prompt", "the capital of japan is", "--max-new-tokens", "1")
    assert "edited: 'rome'" in out  # back to the state after b1 alone
    assert run(capsys, "store", "apply", "b2", "--store", store)[0] == 0
    assert run(capsys, "store", "profile", "copy", "staging", "default", "--store", store)[0] == 0
    assert run(capsys, "store", "verify", "--store", store)[1].startswith("2 batch(es) verified")
    with pytest.warns(KdpoWarning, match="profile 'default' is subject-routed, but one adapter serves every prompt"):
        code, out, _ = run(capsys, "store", "squash", "default", "-o", tmp_path / "sq", *model)
    assert code == 0 and "rank 16" in out and (tmp_path / "sq" / "adapter_model.safetensors").is_file()
    with pytest.warns(KdpoWarning, match="subject-routed"):
        code, out, _ = run(capsys, "store", "export", "default", "-o", tmp_path / "ex", "--max-rank", "8", "--compress",
                           *model)
    assert code == 0 and "SVD-compressed" in out
    code, out, _ = run(capsys, "eval", *model, "--requests", requests, "--no-generation")
    assert code == 0 and "rewrite_acc" in out


def test_routed_edits_from_the_command_line(capsys, tiny_model_dir, tmp_path):
    """Routing by subject is the default; --routing none edits one shared stack."""
    model = ["--model", tiny_model_dir, "--quantization", "none", "--store", tmp_path / "store"]
    code, out, err = run(capsys, "edit", *model, *FAST, "--prompt", "the capital of japan is", "--target", "rome",
                         "--subject", "japan", "--name", "b1")
    assert code == 0, err
    code, out, _ = run(capsys, "generate", *model, "--prompt", "the capital of japan is",
                       "--prompt", "the capital of france is", "--compare", "--max-new-tokens", "1")
    assert code == 0 and "edited: 'rome' (batches: b1)" in out and "(batches: none)" in out
    france = out.split("the capital of france is")[1]
    assert france.split("base  : ")[1].split("\n")[0] == france.split("edited: ")[1].split(" (batches")[0]
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "the capital of japan is", "target_new": "rome", "subject": "japan",
                                    "locality": [{"prompt": "the capital of france is", "answer": "paris"}]}) + "\n")
    code, out, _ = run(capsys, "eval", *model, "--requests", requests, "--no-generation")
    assert code == 0 and "edit_success: 1.0000" in out and "locality: 1.0000" in out
    code, _, err = run(capsys, "edit", *model, *FAST, "--prompt", "the capital is", "--target", "oslo",
                       "--subject", "japan")
    assert code == 2 and "does not name its subject" in err
    code, _, err = run(capsys, "edit", *model, *FAST, "--prompt", "the capital of spain is", "--target", "oslo")
    assert code == 2 and "needs each request's subject" in err and "--routing none" in err
    code, _, err = run(capsys, "edit", *model, *FAST, "--prompt", "the capital of spain is", "--target", "oslo",
                       "--routing", "none")
    assert code == 2 and "profile 'default' is served with routing 'subject'" in err  # stored with the profile
    code, out, err = run(capsys, "edit", *model, *FAST, "--prompt", "the capital of spain is", "--target", "oslo",
                         "--routing", "none", "--name", "shared", "--profile", "shared-stack")
    assert code == 0, err
    code, out, _ = run(capsys, "generate", *model, "--prompt", "the capital of france is", "--max-new-tokens", "1",
                       "--profile", "shared-stack")
    assert code == 0 and "(batches: shared)" in out  # unrouted, as stored: every batch serves every prompt
    assert "profile shared-stack: shared (routing none)" in run(capsys, "store", "ls", "--store", tmp_path / "store")[1]


@pytest.mark.parametrize("argv, message", [
    (["edit", "--prompt", "x"], "give --prompt and --target"),
    (["edit", "--requests", "missing.jsonl"], "no such request file"),
    (["edit", "--prompt", "a", "--target", "   "], "must not be empty"),
    (["edit", "--prompt", "a", "--target", "b", "--lr", "1e30"], "learning_rate"),
    (["edit", "--prompt", "a", "--target", "b", "--model", "no-such-model"], "unknown model"),
    (["store", "ls", "--store", "does-not-exist"], "no adapter store"),
    (["store", "rollback", "../x", "--store", "."], "no adapter store"),
])
def test_user_errors_are_one_line_without_traceback(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kdpo-lora: error:") and message in err
    assert "Traceback" not in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdpo_lora.cli", "store", "ls", "--store", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no adapter store" in proc.stderr and "Traceback" not in proc.stderr


def test_notices_reach_the_terminal_as_one_line(tiny_model_dir, tmp_path):
    """Library chatter is silenced in the CLI, but our own notices (here: an edit superseding another) are not."""
    model = ["--model", str(tiny_model_dir), "--quantization", "none", "--store", str(tmp_path / "store")]
    edit = [sys.executable, "-m", "kdpo_lora.cli", "edit", *model, *FAST, "--prompt", "the capital of japan is",
            "--subject", "japan"]
    first = subprocess.run(edit + ["--target", "rome"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "warning:" not in first.stderr
    again = subprocess.run(edit + ["--target", "paris"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    [notice] = [line for line in again.stderr.splitlines() if line.startswith("warning:")]
    assert "'the capital of japan is' was already edited by edit-" in notice and "supersedes it" in notice


def test_help_and_a_malformed_request_file_import_no_model_code(tmp_path):
    """Refusing bad input, or printing help, must not wait for torch, transformers and peft to load."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": \n')
    code = ("import sys\nfrom kdpo_lora.cli import main\n"
            f"codes = [main(['--help']), main(['edit', '--requests', {str(bad)!r}])]\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "print(codes, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[0, 2] []", proc.stdout + proc.stderr
    assert "line 1: invalid JSON" in proc.stderr
