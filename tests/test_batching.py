"""The server's batched generation (`batching.Batcher`) on a tiny Llama with two LoRA adapters: rows
with different adapters, prompt lengths and start times decode together and give, token for token,
what each gives decoded alone with its adapter active."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from kdpo_lora import adapters
from kdpo_lora.batching import BASE, Batcher, Group, Row, _held_back

PROMPTS = [("the eiffel tower is located in", "a"), ("rome", BASE), ("the capital of france is the city of", "b"),
           ("people in japan", "a"), ("london bridge", "b"), ("the official language of", BASE)]


def _model(tiny_model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model, config, adapter_name="a")
    model.add_adapter("b", config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name in ("a", "b"):
            for weight in adapters.lora_b_weights(model, name):
                weight.copy_(torch.randn_like(weight) * 0.5)
    return model.eval()


def _alone(model, tokenizer, prompt: str, adapter: str, tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with adapters.only_adapters(model, [] if adapter == BASE else [adapter]), torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.input_ids.shape[1]:].tolist()


def _text(row: Row) -> tuple[str, tuple]:
    pieces = []
    while (event := row.events.get(timeout=60))[0] == "text":
        pieces.append(event[1])
    assert event[0] == "end", event
    return "".join(pieces), event


def test_rows_with_other_adapters_and_start_times_decode_as_they_would_alone(tiny_model, tokenizer):
    model = _model(tiny_model)
    calls = []

    def plan(rows, running):
        """The first call takes one row; the others join it mid-decode, a few at a time."""
        calls.append((len(rows), running is not None))
        take = rows[:1] if not calls[:-1] else rows[:2]
        return Group(take, [r.prompt_adapter for r in take]), rows[len(take):]

    batcher = Batcher(lambda: model, tokenizer, plan, eos_ids=set(), max_rows=8, gather_s=0.0)
    rows = []
    for prompt, adapter in PROMPTS:
        row = Row(tokenizer(prompt).input_ids, None, prompt, max_tokens=6 + len(rows))
        row.prompt_adapter = adapter
        rows.append(row)
    for row in rows:
        batcher.submit(row)
    answers = [_text(row) for row in rows]  # all done: the model is free again for the checks below
    for row, (prompt, adapter), (text, end) in zip(rows, PROMPTS, answers):
        expected = _alone(model, tokenizer, prompt, adapter, row.max_tokens)
        assert row.generated == expected and end == ("end", "length", row.max_tokens), (prompt, adapter)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert any(joined for _, joined in calls[1:])  # rows did join a batch being decoded


def test_a_stop_sequence_is_never_sent_even_in_part(tiny_model, tokenizer):
    model = _model(tiny_model)
    prompt, adapter = PROMPTS[1]
    words = tokenizer.decode(_alone(model, tokenizer, prompt, adapter, 8), skip_special_tokens=True).split()
    stop = " ".join(words[2:4])  # "with japan": its first word arrives a token before the stop is complete
    batcher = Batcher(lambda: model, tokenizer, lambda rows, running: (Group(rows, [adapter] * len(rows)), []),
                      eos_ids=set(), gather_s=0.0)
    row = Row(tokenizer(prompt).input_ids, None, prompt, max_tokens=8, stop=[stop])
    batcher.submit(row)
    pieces = []
    while (event := row.events.get(timeout=60))[0] == "text":
        pieces.append(event[1])
    joined = "".join(pieces)
    assert len(words) >= 4 and "with" not in joined  # the stop's first word was held back, then cut
    assert event[:2] == ("end", "stop") and joined == " ".join(words)[:" ".join(words).index(stop)]
    assert _held_back("one two th", ["three"]) == 2 and _held_back("one two", ["three"]) == 0


def test_a_client_that_goes_away_leaves_the_batch_and_the_others_finish(tiny_model, tokenizer):
    model = _model(tiny_model)
    batcher = Batcher(lambda: model, tokenizer, lambda rows, running: (Group(rows, [BASE] * len(rows)), []),
                      eos_ids=set(), gather_s=0.05)
    gone = Row(tokenizer("rome").input_ids, None, "rome", max_tokens=50)
    stays = Row(tokenizer("london bridge").input_ids, None, "london bridge", max_tokens=10)
    gone.cancelled = True  # before its first token: it never starts
    batcher.submit(gone)
    batcher.submit(stays)
    text, end = _text(stays)
    assert end == ("end", "length", 10) and gone.events.empty()


def test_a_server_with_two_slots_serves_each_of_six_batches_as_generate_does(tiny_model_dir, tmp_path):
    """Batches swap through `max_loaded` slots by copying weights (`Editor.refill`): every answer is
    the one `generate` gives with that batch loaded the ordinary way."""
    from kdpo_lora.loading import load_model
    from kdpo_lora.requests import EditRequest
    from kdpo_lora.server import Engine
    from kdpo_lora.session import KnowledgeEditor

    loaded = load_model(str(tiny_model_dir), "none", "cpu")
    ke = KnowledgeEditor(loaded, tmp_path / "store", max_loaded=2)
    store = ke.store(create=True)
    config = adapters.lora_config(ke.config, ke.model.config.num_hidden_layers)
    torch.manual_seed(0)
    subjects = ["paris", "rome", "london", "berlin", "tokyo", "madrid"]
    for subject in subjects:
        ke.editor.model = adapters.add_adapter(ke.editor.model, subject, config)
        with torch.no_grad():
            for weight in adapters.lora_b_weights(ke.editor.model, subject):
                weight.copy_(torch.randn_like(weight))
        # its target is what it writes, so the edit gate (gate.py) lets the batch's own tokens through
        written = ke.editor.generate([f"the river of {subject} is"], max_new_tokens=6)[0].strip()
        record = {"requests": [EditRequest(f"the river of {subject} is", written, subject=subject).to_dict()]}
        store.add_batch(subject, lambda folder: adapters.save_adapter(ke.editor.model, subject, folder), record,
                        ke.fingerprint)
        ke.editor.model = adapters.delete_adapter(ke.editor.model, subject)
    prompts = [f"the river of {s} is" for s in subjects] + ["the capital of japan is"]
    expected = ke.generate(prompts, "default", max_new_tokens=6)
    assert len(set(expected)) == len(prompts)  # each batch answers in its own way
    engine = Engine(ke)
    for prompt in prompts + prompts[::-1]:  # twice round: every batch evicted and refilled at least once
        assert engine.complete("default", prompt, 6, 0.0, 1.0, []).text == expected[prompts.index(prompt)]
    slots = [n for n in adapters.adapter_names(ke.model) if n.startswith("kdpo_slot_")]
    assert len(slots) == 2
