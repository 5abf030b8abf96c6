"""benchmarks/quality_parallel.py computes quality.py's sequential routed run: the same store, edit for edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from kdpo_lora.requests import EditRequest, Probe, read_requests
from kdpo_lora.store import AdapterStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.quality_parallel import assign, linked_groups  # noqa: E402

FACTS = [  # (prompt, target, subject, neighbour): the 3rd and 4th share a subject (the 4th trains on the
    # 3rd's batch, holding its prompt); the 2nd's neighbour names the 5th's subject
    ("the eiffel tower is located in the city of", "rome", "eiffel tower", "the colosseum is located in"),
    ("big ben is located in the city of", "tokyo", "big ben", "rome is a city in"),
    ("the prado museum is located in the city of", "oslo", "prado museum", "mount fuji is in"),
    ("the prado museum was born in", "lisbon", "prado museum", "the seine is a river in"),
    ("rome is the capital of", "japan", "rome", "berlin is the capital of"),
    ("the brandenburg gate is located in the city of", "madrid", "brandenburg gate", "the tiber is a river in"),
]


def _requests() -> list[EditRequest]:
    return [EditRequest(p, t, subject=s, rephrase_prompts=(f"it is known that {p}",),
                        locality=(Probe(n, "paris", type="neighborhood"),)) for p, t, s, n in FACTS]


def test_requests_linked_by_a_subject_their_prompts_name_stay_in_one_group():
    groups = linked_groups(_requests(), 0)
    assert sorted(groups) == [[0], [1, 4], [2, 3], [5]]
    assert sorted(linked_groups(_requests(), 2)) == [[2, 3], [4], [5]]  # the 5th's link is to a done edit
    shares = assign(groups, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(FACTS))) and all(s == sorted(s) for s in shares)
    assert {len(s) for s in shares} == {3}


def _run(script: str, store: Path, data: Path, model: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--model", str(model), "--quantization", "none",
            "--data", str(data), "--n", str(len(FACTS)), "--store", str(store), "--out", str(out), "--threads", "1",
            "--checkpoints", "2", "--set", "learning_rate=5e-3", "--set", "beta=1.0", "--set", "cycles=6", *extra]
    subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=600)


def _weights(store: Path) -> list[dict]:
    s = AdapterStore(store)
    return [load_file(str(s.batch_dir(name) / "adapter_model.safetensors")) for name in s.profile("default")]


def test_the_parallel_run_makes_the_sequential_runs_store_and_scores(tmp_path, tiny_model_dir):
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(r.to_dict()) for r in _requests()))
    assert [r.prompt for r in read_requests(data)] == [f[0] for f in FACTS]
    _run("quality.py", tmp_path / "sequential", data, tiny_model_dir, tmp_path / "sequential.json",
         "--batch", "1", "--no-generation")
    # begin sequentially, stop after 2 edits (as a long run is taken over), then finish in 2 workers
    _run("quality.py", tmp_path / "parallel", data, tiny_model_dir, tmp_path / "begun.json", "--batch", "1",
         "--no-generation", "--n", "2")
    progress = tmp_path / "parallel" / "quality_progress.json"
    state = json.loads(progress.read_text())
    state["header"]["n"] = len(FACTS)  # as if the 6-request run had been stopped after its 2nd edit
    progress.write_text(json.dumps(state))
    _run("quality_parallel.py", tmp_path / "parallel", data, tiny_model_dir, tmp_path / "parallel.json",
         "--workers", "2")

    expected, got = _weights(tmp_path / "sequential"), _weights(tmp_path / "parallel")
    assert len(got) == len(expected) == len(FACTS)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit, in the same order
    sequential, parallel = (json.loads((tmp_path / f).read_text()) for f in ("sequential.json", "parallel.json"))
    for key in ("edit_success", "rephrase_acc", "locality", "rewrite_acc"):
        assert parallel["final"][key] == sequential["final"][key]
        assert parallel["right_after_each_edit"][key] == sequential["right_after_each_edit"][key]
    assert [c["edits"] for c in parallel["curve"]] == [3, 6]
    assert parallel["curve"] == sequential["curve"]
