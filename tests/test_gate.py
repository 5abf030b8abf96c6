"""The edit gate (`gate.py`): a served edit writes its own fact, and the rest of every answer about
its subject is the unedited model's - in `generate`, in the evaluation and in the server."""

from __future__ import annotations

import torch

from kdpo_lora import adapters
from kdpo_lora.evaluate import score_targets
from kdpo_lora.gate import Gate
from kdpo_lora.requests import EditRequest

EDITED = "the river of paris is"
OTHER = "paris people speak"  # the subject's other fact: the same batch is routed to it


def test_allowed_tokens_continue_a_target_or_the_prompt_restated_until_the_target_is_written(tokenizer):
    gate = Gate(tokenizer, [EditRequest("the capital of france is", "rome", subject="france")])
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    starts = gate.allowed([])
    assert ids("rome")[0] in starts and ids("the")[0] in starts and ids("london")[0] not in starts
    after = gate.allowed(ids("the capital of"))
    assert ids("france")[0] in after and ids("spain")[0] not in after
    assert ids("rome")[0] in gate.allowed(ids("so the capital of france is"))
    assert gate.allowed(ids("rome and")) == set()  # stated once: the rest is the unedited model's


def _store_random_batch(tiny_model_dir, tmp_path):
    """A store with one batch about paris whose adapter (random weights) changes every answer; its
    request's target is the word it writes after EDITED."""
    from kdpo_lora.loading import load_model
    from kdpo_lora.session import KnowledgeEditor

    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), tmp_path / "store")
    unedited = ke.generate([EDITED, OTHER], None, max_new_tokens=4)
    config = adapters.lora_config(ke.config, ke.model.config.num_hidden_layers)
    ke.editor.model = adapters.add_adapter(ke.editor.model, "paris", config)
    for seed in range(20):  # weights whose first token after EDITED is a word (the tiny vocabulary has gaps)
        torch.manual_seed(seed)
        with torch.no_grad():
            for weight in adapters.lora_b_weights(ke.editor.model, "paris"):
                weight.copy_(torch.randn_like(weight))
        ungated = [ke.editor.generate([EDITED], max_new_tokens=1)[0], ke.editor.generate([OTHER], max_new_tokens=4)[0]]
        if ungated[0].strip():
            break
    request = EditRequest(EDITED, ungated[0].strip(), subject="paris")
    ke.store(create=True).add_batch("paris", lambda folder: adapters.save_adapter(ke.editor.model, "paris", folder),
                                    {"requests": [request.to_dict()]}, ke.fingerprint)
    ke.editor.model = adapters.delete_adapter(ke.editor.model, "paris")
    return ke, request, unedited, ungated


def test_the_gate_keeps_the_subjects_other_facts_and_writes_the_edit(tiny_model_dir, tmp_path):
    ke, request, unedited, ungated = _store_random_batch(tiny_model_dir, tmp_path)
    assert ungated[1] != unedited[1]  # without the gate the adapter moves the other fact
    ke.use("default")
    assert ke.route(OTHER) == ["paris"]
    assert ke.generate([EDITED], "default", max_new_tokens=1) == [ungated[0]]
    assert ke.generate([OTHER], "default", max_new_tokens=4) == [unedited[1]]
    # teacher-forced the same: every position of the other fact's answer is the unedited model's; in
    # a new session, with the model taken before the batch loaded (peft wraps it then)
    from kdpo_lora.loading import load_model
    from kdpo_lora.session import KnowledgeEditor

    fresh = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), tmp_path / "store")
    fresh.use("default")
    model = fresh.model
    rows = score_targets(model, fresh.loaded.tokenizer, [EDITED, OTHER], [request.target_new, unedited[1]], fresh.route)
    assert rows[0]["argmax"] == rows[0]["target"]
    assert rows[1]["argmax"] == rows[1]["target"]


def test_the_server_serves_through_the_gate(tiny_model_dir, tmp_path):
    from kdpo_lora.server import Engine

    ke, _, unedited, ungated = _store_random_batch(tiny_model_dir, tmp_path)
    engine = Engine(ke)
    assert engine.complete("default", OTHER, 4, 0.0, 1.0, []).text == unedited[1]
    assert engine.complete("default", EDITED, 1, 0.0, 1.0, []).text == ungated[0]
    assert engine.complete("paris", OTHER, 4, 0.0, 1.0, []).text == unedited[1]  # the batch alone, gated too
