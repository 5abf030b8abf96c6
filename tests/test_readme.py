"""The README is what users run: every snippet in it runs here on the embedded SmolLM2, its defaults
table is the dataclass's, and it stays short."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kdpo_lora.config import help_lines

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def cli_lines() -> list[list[str]]:
    """Each `kdpo-lora ...` command of the bash blocks (the set-up's demo included), as arguments."""
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            command = command.split("&& .venv/bin/", 1)[-1]
            if command.startswith("kdpo-lora "):
                lines.append(shlex.split(command)[1:])
    return lines


def test_the_readme_is_short_and_its_defaults_table_is_the_dataclass():
    assert len(README.encode()) <= 10 * 1024
    for key, default, text in help_lines():
        shown = ", ".join(default) if isinstance(default, tuple) else (
            "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default))
        assert f"| `{key}` | {shown} | {text} |" in README, key


@pytest.mark.slow
def test_every_command_line_snippet_runs(tmp_path):
    commands = [c for c in cli_lines() if c[0] != "serve"]
    assert [c[0] for c in commands] == ["demo", "edit", "generate", "store", "store", "store"]
    outputs = []
    for args in commands:
        if args[0] == "demo":
            args = args + ["--quiet"]
        proc = subprocess.run([sys.executable, "-m", "kdpo_lora.cli", *args], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        outputs.append(proc.stdout)
    assert "stored batch eiffel-rome" in outputs[1]
    assert "edited: ' Rome" in outputs[2] and "(batches: eiffel-rome)" in outputs[2]
    assert "eiffel-rome: subject 'Eiffel Tower'" in outputs[2]  # why it served
    assert "eiffel-rome" in outputs[3] and "rolled back eiffel-rome" in outputs[4]
    assert "would remove eiffel-rome (batch no profile uses)" in outputs[5]


@pytest.mark.slow
def test_the_python_snippet_runs(tmp_path):
    [code] = blocks("python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    edited, undone = proc.stdout.strip().splitlines()[-2:]
    assert edited.startswith("[' Rome") and not undone.startswith("[' Rome")
    assert (tmp_path / "eiffel-export" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_the_serve_snippet_serves_an_openai_client(tmp_path):
    from openai import OpenAI

    [args] = [c for c in cli_lines() if c[0] == "serve"]
    port = args[args.index("--port") + 1]
    proc = subprocess.Popen([sys.executable, "-m", "kdpo_lora.cli", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving default" in proc.stdout.readline()  # a new store serves the unedited model
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=20, timeout=300)
        assert [m.id for m in client.models.list()] == ["default"]
        answer = client.chat.completions.create(model="default", max_tokens=8,
                                                messages=[{"role": "user", "content": "Say hello."}])
        assert answer.choices[0].message.content and answer.model_extra["kdpo_batches"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not (tmp_path / "adapters").exists()  # serving created nothing
