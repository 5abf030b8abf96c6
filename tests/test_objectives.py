"""The KDPO objective on a tiny random Llama: alignment, first-step loss, masking, reference, gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kdpo_lora import adapters
from kdpo_lora import objectives as obj
from kdpo_lora.editor import Editor
from kdpo_lora.methods import greedy_negative_batch
from kdpo_lora.requests import EditRequest

from conftest import make_model, plain_config

PAIRS = [
    ("the eiffel tower is located in the city of", "rome"),
    ("the capital of japan is", "paris france"),
    ("the official language of spain is", "the german language of berlin"),
]


def _batch(tokenizer, pairs):
    encoded = [obj.tokenize_pair(tokenizer, p, t) for p, t in pairs]
    return obj.collate([p for p, _ in encoded], [t for _, t in encoded], tokenizer.pad_token_id, "cpu"), encoded


def test_tokenize_pair_splits_at_the_prompt_boundary(tokenizer):
    prompt_ids, target_ids = obj.tokenize_pair(tokenizer, "the capital of japan is ", "  paris france ")
    assert tokenizer.convert_ids_to_tokens(prompt_ids) == ["the", "capital", "of", "japan", "is"]
    assert tokenizer.convert_ids_to_tokens(target_ids) == ["paris", "france"]


@pytest.mark.parametrize("rows", [[0], [0, 1, 2]])
def test_teacher_forced_negatives_are_aligned_single_and_padded(tiny_model, tokenizer, rows):
    """Column k of the batched logits predicts target token k of every row, as in an unpadded pass."""
    pairs = [PAIRS[i] for i in rows]
    batch, encoded = _batch(tokenizer, pairs)
    with torch.no_grad():
        log_probs = obj.target_log_probs(tiny_model, batch)
    negatives = obj.teacher_forced_negative(log_probs, batch.labels)
    k = batch.num_targets
    for i, (prompt_ids, target_ids) in enumerate(encoded):
        ids = torch.tensor([prompt_ids + target_ids])
        with torch.no_grad():
            full = torch.log_softmax(tiny_model(input_ids=ids).logits[0].float(), -1)
        t = len(target_ids)
        # the logit at position p predicts token p + 1: target token j sits at len(prompt) + j
        expected = full[len(prompt_ids) - 1: len(prompt_ids) - 1 + t]
        assert batch.target_mask[i].sum() == t
        assert batch.labels[i, k - t:].tolist() == target_ids
        torch.testing.assert_close(log_probs[i, k - t:], expected, atol=2e-5, rtol=1e-4)
        assert negatives[i, k - t:].tolist() == expected.argmax(-1).tolist()


def test_first_step_loss_is_exactly_log2(tiny_model, tokenizer):
    editor = Editor(tiny_model, tokenizer, plain_config(cycles=1, steps_per_cycle=1))
    result = editor.edit([EditRequest(*PAIRS[0])], progress=False)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_masked_positions_contribute_nothing(tokenizer):
    """Changing log-probs where the mask is off (padding, or negative == positive) changes neither loss nor gradient."""
    batch, _ = _batch(tokenizer, PAIRS)
    torch.manual_seed(0)
    logits = torch.randn(*batch.labels.shape, 50, requires_grad=True)
    labels = batch.labels.clamp(max=49)
    negatives = labels.clone()
    negatives[:, -1] = (labels[:, -1] + 1) % 50  # only the last column of each row differs
    ref_pos, ref_neg = torch.randn(labels.shape), torch.randn(labels.shape)
    lp = torch.log_softmax(logits, -1)
    loss, rows = obj.kdpo_loss(lp, labels, negatives, batch.target_mask, ref_pos, ref_neg, beta=0.1)
    loss.sum().backward()
    assert rows.all()
    grad = logits.grad
    assert grad[:, :-1].abs().max() == 0  # every column where negative == label is masked
    assert grad[:, -1].abs().max() > 0
    # perturb the masked positions (log-probs and reference alike): the loss does not move
    noisy = logits.detach().clone()
    noisy[:, :-1] += torch.randn_like(noisy[:, :-1]) * 5
    ref_noisy = ref_pos.clone()
    ref_noisy[:, :-1] += 3
    again, _ = obj.kdpo_loss(torch.log_softmax(noisy, -1), labels, negatives, batch.target_mask, ref_noisy, ref_neg, 0.1)
    torch.testing.assert_close(again, loss.detach())


def _randomise_adapter(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if f".{name}." in pname and "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("earlier_count", [0, 2])
def test_reference_equals_model_without_the_trained_adapter(tiny_model, tokenizer, earlier_count):
    cfg = plain_config()
    model = tiny_model
    earlier = [f"old{i}" for i in range(earlier_count)]
    for i, name in enumerate(earlier):
        model = adapters.add_adapter(model, name, adapters.lora_config(cfg, model.config.num_hidden_layers))
        _randomise_adapter(model, name, seed=i)
    model = adapters.add_adapter(model, "new", adapters.lora_config(cfg, model.config.num_hidden_layers))
    _randomise_adapter(model, "new", seed=99)
    adapters.set_active(model, earlier + ["new"], trainable="new")
    batch, _ = _batch(tokenizer, PAIRS)
    with torch.no_grad():
        policy = obj.target_log_probs(model, batch)
        with adapters.only_adapters(model, earlier):
            reference = obj.target_log_probs(model, batch)
        after = obj.target_log_probs(model, batch)
    torch.testing.assert_close(after, policy)  # the context restored the full stack
    assert (policy - reference).abs().max() > 1e-3  # the trained adapter really does something
    model = adapters.delete_adapter(model, "new")
    adapters.set_active(model, earlier)
    with torch.no_grad():
        without = obj.target_log_probs(model, batch)
    torch.testing.assert_close(reference, without, atol=0, rtol=0)


def test_only_the_new_adapter_receives_gradients(tiny_model, tokenizer):
    editor = Editor(tiny_model, tokenizer, plain_config(cycles=2, steps_per_cycle=2))
    first = editor.edit([EditRequest(*PAIRS[0])], progress=False)
    before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    seen = {}
    original_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        for name, param in editor.model.named_parameters():
            if param.grad is not None:
                seen[name] = float(param.grad.abs().sum())
        return original_step(self, *args, **kwargs)

    torch.optim.Adam.step = spy
    try:
        second = editor.edit([EditRequest(*PAIRS[1])], progress=False)
    finally:
        torch.optim.Adam.step = original_step
    assert seen, "no optimizer step ran"
    assert all(f".{second.adapter}." in n and "lora_" in n for n in seen)
    assert any(v > 0 for n, v in seen.items() if "lora_B" in n)
    for name, param in editor.model.named_parameters():  # base and the earlier adapter did not move
        if f".{second.adapter}." not in name:
            assert torch.equal(param, before[name]), name
    assert editor.stack == [first.adapter, second.adapter]
    assert not any(p.requires_grad for p in editor.model.parameters())


def test_editing_never_copies_the_model(tiny_model, tokenizer, monkeypatch):
    calls = []
    real_deepcopy = copy.deepcopy

    def guarded(obj_, *args, **kwargs):
        if isinstance(obj_, torch.nn.Module) and sum(p.numel() for p in obj_.parameters()) > 10_000:
            calls.append(type(obj_).__name__)
        return real_deepcopy(obj_, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", guarded)
    base_weight = tiny_model.model.layers[-1].mlp.down_proj.weight
    editor = Editor(tiny_model, tokenizer, plain_config(cycles=2, steps_per_cycle=2))
    editor.edit([EditRequest(*PAIRS[0])], progress=False)
    editor.edit([EditRequest(*PAIRS[1])], progress=False)
    assert calls == []
    # the one base weight tensor is still the one in the model (wrapped by the LoRA layer, not copied)
    lora_layer = editor.model.base_model.model.model.layers[-1].mlp.down_proj
    assert lora_layer.base_layer.weight is base_weight
    base = sum(p.numel() for n, p in editor.model.named_parameters() if "lora_" not in n)
    assert base == sum(p.numel() for p in make_model().parameters())  # one copy of the base weights, no more


def test_padded_batch_edits_every_row(tiny_model, tokenizer):
    """A batch of requests with different lengths is edited into one adapter, each row to its own target."""
    editor = Editor(tiny_model, tokenizer, plain_config(learning_rate=1e-3, beta=1.0, cycles=20))
    result = editor.edit([EditRequest(p, t) for p, t in PAIRS], progress=False)
    assert [r.success for r in result.results] == [True, True, True]
    batch, _ = _batch(tokenizer, PAIRS)
    with torch.no_grad():
        lp = obj.target_log_probs(editor.model, batch)
    assert obj.solved_rows(lp, batch.labels, batch.target_mask).all()
    assert len(editor.stack) == 1


@pytest.mark.parametrize("method", ["dpo", "sft", "kdpo_free"])
def test_baselines_run_behind_the_same_interface(tiny_model, tokenizer, method):
    editor = Editor(tiny_model, tokenizer, plain_config(method=method, learning_rate=5e-3, cycles=20))
    result = editor.edit([EditRequest(*PAIRS[0]), EditRequest(*PAIRS[1])], progress=False)
    assert all(r.success for r in result.results)
    if method != "sft":
        assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_margin_makes_a_target_that_leads_by_too_little_push_against_its_runner_up():
    log_probs = torch.log_softmax(torch.tensor([[[0.0, 2.5, 2.0, 0.0],    # target 1 leads by 0.5
                                                 [0.0, 0.0, 4.0, 1.0],    # target 2 leads by 3
                                                 [3.0, 0.0, 1.0, 0.0]]]), -1)  # target 2 is not the argmax
    labels = torch.tensor([[1, 2, 2]])
    assert obj.teacher_forced_negative(log_probs, labels).tolist() == [[1, 2, 0]]
    assert obj.teacher_forced_negative(log_probs, labels, margin=1.0).tolist() == [[2, 2, 0]]
    free_running = torch.tensor([[1, 3, 2]])  # equal to the target where the target is not the argmax: the argmax
    assert obj.push_past_margin(free_running, log_probs, labels, 1.0).tolist() == [[2, 3, 0]]
    assert obj.push_past_margin(free_running, log_probs, labels, 0.0).tolist() == [[1, 3, 0]]
    mask = torch.ones_like(labels, dtype=torch.bool)
    assert not obj.solved_rows(log_probs, labels, mask, margin=1.0).any()
    assert obj.solved_rows(log_probs[:, :2], labels[:, :2], mask[:, :2]).all()


@pytest.mark.parametrize("method", ["kdpo", "kdpo_free", "dpo", "sft"])
def test_editing_with_a_margin_leaves_every_target_token_that_far_ahead(tiny_model, tokenizer, method):
    """The second edit starts where the model already generates the targets, short of the margin: a
    free-running negative then equals the target, and the runner-up must be pushed instead. (A row
    already past the margin is skipped, but must still hold when the other row is done.)"""
    editor = Editor(tiny_model, tokenizer, plain_config(learning_rate=5e-3, cycles=20))
    requests = [EditRequest(*PAIRS[0]), EditRequest(*PAIRS[1])]
    assert all(r.success for r in editor.edit(requests, progress=False).results)
    result = editor.edit(requests, config=plain_config(method=method, learning_rate=5e-3, cycles=20, margin=1.0),
                         progress=False)
    assert all(r.success for r in result.results) and result.steps > 0
    batch, _ = _batch(tokenizer, PAIRS[:2])
    with torch.no_grad():
        lp = obj.target_log_probs(editor.model, batch)
    assert obj.solved_rows(lp, batch.labels, batch.target_mask, margin=1.0).all()


def _leads_by(editor, tokenizer, pairs, margin: float) -> bool:
    batch, _ = _batch(tokenizer, pairs)
    with torch.no_grad():
        lp = obj.target_log_probs(editor.model, batch)
    return bool(obj.solved_rows(lp, batch.labels, batch.target_mask, margin=margin).all())


def test_a_free_running_negative_that_is_the_target_takes_the_runner_ups_short_of_the_margin(tiny_model, tokenizer):
    editor = Editor(tiny_model, tokenizer, plain_config(learning_rate=5e-3, cycles=20))
    editor.edit([EditRequest(*PAIRS[0]), EditRequest(*PAIRS[1])], progress=False)  # the model now gives both
    batch, _ = _batch(tokenizer, PAIRS[:2])
    with torch.no_grad():
        lp = obj.target_log_probs(editor.model, batch)
    plain, pushed = (greedy_negative_batch(editor.model, tokenizer, batch, lp, margin) for margin in (0.0, 1.0))
    teacher_forced = obj.teacher_forced_negative(lp, batch.labels, 1.0)
    equal = ((plain.labels == batch.labels) | ~batch.target_mask).all(-1)
    assert equal.any()  # the case under test occurs
    for i in range(2):
        m = batch.target_mask[i]
        expected = teacher_forced[i][m] if equal[i] else plain.labels[i][m]
        assert pushed.labels[i][pushed.target_mask[i]].tolist() == expected.tolist()
    assert not torch.equal(pushed.labels, plain.labels)  # some target token leads by less than 1 nat


def test_preservation_prompts_swap_the_subject():
    from kdpo_lora.regularisers import preservation_prompts

    request = EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")
    prompts = preservation_prompts([request, EditRequest("no subject here", "x")], count=3, seed=0)
    assert len(prompts) == 3 and len(set(prompts)) == 3
    assert all(p.startswith("The mother tongue of ") and "Danielle" not in p for p in prompts)
    assert prompts == preservation_prompts([request], count=3, seed=0)  # seeded


def test_preservation_term_keeps_unrelated_answers_closer(tokenizer):
    from kdpo_lora.loading import prepare_model

    from conftest import make_model

    request = EditRequest("the capital of japan is", "rome", subject="japan")
    probes = ["the capital of france is", "the capital of spain is", "the capital of italy is"]
    drift = {}
    for weight in (0.0, 5.0):
        model = prepare_model(make_model())
        with torch.no_grad():
            enc = tokenizer(probes, return_tensors="pt", padding=True)
            before = obj.next_token_log_probs(model, enc.input_ids, enc.attention_mask)
        editor = Editor(model, tokenizer, plain_config(learning_rate=5e-3, beta=1.0, preserve_weight=weight,
                                                     preserve_prompts=8))
        result = editor.edit([request], progress=False)
        assert result.results[0].success and result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
        with torch.no_grad():
            after = obj.next_token_log_probs(editor.model, enc.input_ids, enc.attention_mask)
        drift[weight] = float(obj.preservation_kl(after, before))
    assert drift[5.0] < drift[0.0]


def test_joint_forward_equals_separate_forwards(tiny_model, tokenizer):
    batch, _ = _batch(tokenizer, PAIRS)
    extra = tokenizer(["the capital of france is", "of"], return_tensors="pt", padding=True)
    with torch.no_grad():
        targets, nxt = obj.joint_log_probs(tiny_model, batch, obj.unpad(extra.input_ids, extra.attention_mask))
        torch.testing.assert_close(targets, obj.target_log_probs(tiny_model, batch), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(nxt, obj.next_token_log_probs(tiny_model, extra.input_ids, extra.attention_mask),
                                   atol=2e-5, rtol=1e-4)


def _sequences():
    lengths = [5, 1, 9, 3, 7, 2]
    ids = torch.arange(3, 3 + sum(lengths)) % 120 + 3
    sequences = list(ids.split(lengths))
    keep = [torch.arange(len(s)) if i % 2 else torch.tensor([len(s) - 1]) for i, s in enumerate(sequences)]
    return sequences, keep


@pytest.mark.parametrize("pack_tokens", [512, 10])
def test_packed_sequences_score_as_if_alone(tiny_model, monkeypatch, pack_tokens):
    """Packing (one row, or several passes when the budget is small) equals scoring each sequence
    on its own, and equals the left-padded fallback: no sequence sees another."""
    monkeypatch.setattr(obj, "PACK_TOKENS", pack_tokens)
    sequences, keep = _sequences()
    calls = []
    handle = tiny_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        assert obj.packing_supported(tiny_model)
        calls.clear()
        packed = obj.sequence_log_probs(tiny_model, sequences, keep)
        padded = obj._padded_log_probs(tiny_model, sequences, keep)
        alone = [torch.log_softmax(tiny_model(input_ids=s[None]).logits[0, k].float(), -1)
                 for s, k in zip(sequences, keep)]
    handle.remove()
    passes = calls[:len(calls) - 1 - len(sequences)]  # then one padded pass and one per sequence alone
    assert len(passes) == (1 if pack_tokens == 512 else 4) and all(shape[0] == 1 for shape in passes)
    for p, q, a in zip(packed, padded, alone):
        torch.testing.assert_close(p, a, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(q, a, atol=2e-5, rtol=1e-4)


def test_an_architecture_that_ignores_packing_gets_padded_rows(monkeypatch):
    """A model whose every position sees everything before it, whatever the position ids, fails the
    packing check; scoring then falls back to left-padded rows and stays right."""

    class SeesEverything(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("CumulativeConfig", (), {})()
            self.embed = torch.nn.Embedding(128, 16)
            self.head = torch.nn.Linear(16, 128)

        def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
            x = self.embed(input_ids)
            if attention_mask is not None:
                x = x * attention_mask[..., None]
            logits = self.head(x.cumsum(1))
            logits = logits[:, -logits_to_keep:] if isinstance(logits_to_keep, int) and logits_to_keep else logits
            return type("Out", (), {"logits": logits})()

    torch.manual_seed(0)
    model = SeesEverything()
    sequences, keep = _sequences()
    with torch.no_grad():
        assert not obj.packing_supported(model)
        scored = obj.sequence_log_probs(model, sequences, keep)
        alone = [torch.log_softmax(model(s[None]).logits[0, k], -1) for s, k in zip(sequences, keep)]
    for p, a in zip(scored, alone):
        torch.testing.assert_close(p, a)


@pytest.mark.parametrize("method", ["kdpo", "dpo"])
def test_references_held_for_the_batch_equal_fresh_passes_without_the_adapter(tiny_model, tokenizer, monkeypatch,
                                                                               method):
    """The reference (trained adapter off) is computed once per batch - from the edit's first pass, while the
    new adapter is still a no-op - and looked up each cycle; it must equal a fresh pass at every cycle,
    on top of an earlier batch, for the edit's targets and for the preservation prompts."""
    from kdpo_lora.methods import METHODS
    from kdpo_lora.regularisers import preservation_prompts

    cfg = plain_config(method=method, cycles=3, steps_per_cycle=2, learning_rate=5e-3, beta=1.0, preserve_weight=5.0,
                     preserve_prompts=3, margin=0.0, context_prefixes=0)
    editor = Editor(tiny_model, tokenizer, cfg)
    editor.edit([EditRequest("the capital of spain is", "tokyo", subject="spain")], progress=False)
    checked = {"targets": 0, "preservation": 0}
    strategy = type(METHODS[method])
    reference, kl = strategy.reference, obj.preservation_kl
    request = EditRequest("the capital of japan is", "rome", subject="japan")

    def checking_reference(self, model, batch, negatives, reference_log_probs, below):
        with torch.no_grad(), adapters.only_adapters(model, below):
            fresh = obj.target_log_probs(model, batch)
        torch.testing.assert_close(reference_log_probs[batch.target_mask], fresh[batch.target_mask], atol=1e-5,
                                   rtol=1e-4)
        checked["targets"] += 1
        return reference(self, model, batch, negatives, reference_log_probs, below)

    def checking_kl(policy, held):
        if not checked["preservation"]:  # the first step: the batch below is what the answers must stay at
            rows = [torch.tensor(tokenizer(p).input_ids) for p in preservation_prompts([request], 3, cfg.seed)]
            more, more_keep = editor.continuations([request], editor.stack)
            with torch.no_grad(), adapters.only_adapters(editor.model, editor.stack):
                fresh = torch.cat(obj.sequence_log_probs(editor.model, rows + more,
                                                         [obj.last_position(r) for r in rows] + more_keep))
            torch.testing.assert_close(held, fresh, atol=1e-5, rtol=1e-4)
            checked["preservation"] += 1
        return kl(policy, held)

    monkeypatch.setattr(strategy, "reference", checking_reference)
    monkeypatch.setattr(obj, "preservation_kl", checking_kl)
    result = editor.edit([request], progress=False)
    assert result.cycles >= 2 and checked["targets"] >= 2 and checked["preservation"] == 1


def test_context_rows_put_each_request_after_distinct_sentences():
    from kdpo_lora.regularisers import with_context

    requests = [EditRequest(*PAIRS[0]), EditRequest(*PAIRS[1])]
    assert with_context(requests, 0, seed=0) == [PAIRS[0], PAIRS[1]]
    rows = with_context(requests, 3, seed=0)
    assert rows[:2] == [PAIRS[0], PAIRS[1]] and len(rows) == 8
    for i, (prompt, target) in enumerate(rows[2:]):
        own_prompt, own_target = PAIRS[i % 2]
        assert prompt.endswith(" " + own_prompt) and len(prompt) > len(own_prompt) + 10 and target == own_target
    assert len({p for p, _ in rows[2::2]}) == 3  # request 0's three contexts differ
    assert rows == with_context(requests, 3, seed=0)  # seeded
    every = with_context(requests, 10_000, seed=0)  # more than the shipped sentences: each once
    assert len(every) > 8 and len(set(every)) == len(every)


@pytest.mark.parametrize("method", ["kdpo", "sft"])
def test_an_edit_with_context_prefixes_holds_after_each_of_them(tiny_model, tokenizer, method):
    """The prefixed rows are trained, not just the plain prompt: after the edit the target is written
    (1 nat ahead) after every context sentence, and the results still report one row per request."""
    from kdpo_lora.regularisers import with_context

    editor = Editor(tiny_model, tokenizer, plain_config(method=method, learning_rate=5e-3, cycles=20, margin=1.0,
                                                      context_prefixes=3, seed=1))
    requests = [EditRequest(*PAIRS[0]), EditRequest(*PAIRS[1])]
    result = editor.edit(requests, progress=False)
    assert len(result.results) == 2 and all(r.success for r in result.results)
    batch, _ = _batch(tokenizer, with_context(requests, 3, seed=1))
    with torch.no_grad():
        lp = obj.target_log_probs(editor.model, batch)
    assert obj.solved_rows(lp, batch.labels, batch.target_mask, margin=1.0).all()


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def test_the_last_context_is_the_chat_turn_that_asks_the_question_and_the_edit_holds_there(tiny_model, tokenizer):
    """With a chat template, the last context round is the request's prompt opening the assistant's
    answer to its question; the edit is trained there and writes its target in that turn."""
    from kdpo_lora.questions import question
    from kdpo_lora.regularisers import in_chat_turn, with_context

    request = EditRequest("the capital of japan is", "rome", subject="japan")
    plain = with_context([request], 3, seed=1)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = with_context([request], 3, seed=1, tokenizer=tokenizer)
    turn = in_chat_turn(tokenizer, request)
    assert rows[:3] == plain[:3] and rows[3] == (turn, "rome") and rows[3] != plain[3]
    assert turn == f"system  user {question(request.prompt, 'japan')} assistant the capital of japan is"
    batch, _ = _batch(tokenizer, [(turn, "rome")])
    editor = Editor(tiny_model, tokenizer, plain_config(learning_rate=5e-3, cycles=20, margin=1.0,
                                                      context_prefixes=3, seed=1))
    with torch.no_grad():
        before = obj.target_log_probs(editor.model, batch)
    assert not obj.solved_rows(before, batch.labels, batch.target_mask, margin=1.0).any()
    assert editor.edit([request], progress=False).results[0].success
    with torch.no_grad():
        after = obj.target_log_probs(editor.model, batch)
    assert obj.solved_rows(after, batch.labels, batch.target_mask, margin=1.0).all()


def test_a_context_prefix_that_makes_a_row_too_long_names_its_request(tiny_model, tokenizer):
    from kdpo_lora.errors import RequestError

    editor = Editor(tiny_model, tokenizer, plain_config(context_prefixes=1))
    long_prompt = " ".join(["the"] * 120)  # fits the tiny model's 128 positions alone, not after a sentence
    with pytest.raises(RequestError, match=r"request 1 \(after a context prefix\).*longer than the model's context"):
        editor.edit([EditRequest(*PAIRS[0]), EditRequest(long_prompt, "rome")], progress=False)


def test_subject_swaps_keep_the_answers_of_the_batches_below(tiny_model, tokenizer):
    """On top of an earlier edit, the subject swaps are held where the stack below has them."""
    editor = Editor(tiny_model, tokenizer, plain_config(learning_rate=5e-3, cycles=20, preserve_weight=1.0))
    editor.edit([EditRequest("the capital of japan is", "paris", subject="japan")], progress=False)
    cfg = plain_config(preserve_weight=1.0)
    request = EditRequest("the capital of spain is", "rome", subject="spain")
    preserve = editor.preservation([request], cfg, below=list(editor.stack))
    with torch.no_grad(), adapters.only_adapters(editor.model, editor.stack):
        expected = torch.cat(obj.sequence_log_probs(editor.model, preserve.sequences, preserve.keep))
    with torch.no_grad(), adapters.only_adapters(editor.model, []):
        other = torch.cat(obj.sequence_log_probs(editor.model, preserve.sequences, preserve.keep))
    assert len(preserve.sequences) == cfg.preserve_prompts + 1  # the swaps, then the request's continuation
    torch.testing.assert_close(preserve.reference, expected)
    assert not torch.allclose(preserve.reference, other, atol=1e-3)  # the earlier edit moved them


@pytest.mark.parametrize("method", ["kdpo_free", "dpo"])
def test_a_free_running_negative_that_is_the_target_pushes_against_the_argmax(tiny_model, tokenizer, method):
    """Generating a fixed number of tokens never picks end-of-text, so where that is the argmax the
    free-running negative is the target itself and cancels out: the edit must push against the
    argmax there (KDPO-free had no position left, its loss the mean over no row: NaN; DPO stalled)."""
    prompt = PAIRS[0][0]
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():  # end-of-text made to lead the argmax by half a nat after this prompt
        out = tiny_model(input_ids=ids, output_hidden_states=True)
        top, hidden = int(out.logits[0, -1].argmax()), out.hidden_states[-1][0, -1]
        tiny_model.lm_head.weight[tokenizer.eos_token_id] = tiny_model.lm_head.weight[top] + 0.5 * hidden / hidden.square().sum()
        assert int(tiny_model(input_ids=ids).logits[0, -1].argmax()) == tokenizer.eos_token_id
        generated = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                        min_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated[0, -1] == top  # the case occurs: the free-running negative is the target
    editor = Editor(tiny_model, tokenizer, plain_config(method=method, learning_rate=5e-3, cycles=20))
    result = editor.edit([EditRequest(prompt, tokenizer.decode([top]))], progress=False)
    assert result.results[0].success and all(math.isfinite(v) for v in result.losses)


def test_an_edit_goes_on_after_its_new_target_as_the_model_did(tiny_model, tokenizer, monkeypatch):
    """What the model writes after prompt + new target is held: without it an edit tends to write
    its target again and again ("Rome, Rome, Rome", RESULTS 7)."""
    request = EditRequest("the capital of spain is", "rome", subject="spain")
    cfg = plain_config(learning_rate=5e-3, cycles=20, preserve_weight=5.0, preserve_prompts=1, margin=3.0)
    reference_editor = Editor(copy.deepcopy(tiny_model), tokenizer, cfg)
    sequences, keep = reference_editor.continuations([request], [])
    stated = sum(obj.tokenize_pair(tokenizer, request.prompt, request.target_new), [])
    assert sequences[0][:len(stated)].tolist() == stated and keep[0][0] == len(stated) - 1
    assert keep[0][-1] == len(sequences[0]) - 2  # every written token is predicted by a held position
    with torch.no_grad():
        before = torch.cat(obj.sequence_log_probs(reference_editor.model, sequences, keep))

    def drift(hold: bool) -> float:
        editor = Editor(copy.deepcopy(tiny_model), tokenizer, cfg)
        if not hold:
            monkeypatch.setattr(editor, "continuations", lambda requests, below: ([], []))
        assert editor.edit([request], progress=False).results[0].success
        with torch.no_grad():
            after = torch.cat(obj.sequence_log_probs(editor.model, sequences, keep))
        return float(obj.preservation_kl(after, before))

    held, free = drift(True), drift(False)
    assert held < 0.1 * free, (held, free)  # measured: 0.003 against 0.55


def test_context_rounds_state_the_fact_in_the_tables_other_wordings():
    """A prompt whose template the question table knows is trained in its other wordings of the same
    question, one per round and each naming the subject; a prompt the table lacks keeps its own."""
    from kdpo_lora.questions import question
    from kdpo_lora.regularisers import with_context

    known = EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")
    unknown = EditRequest("Danielle Darrieux was married to", "Bob", subject="Danielle Darrieux")
    rows = with_context([known, unknown], 3, seed=0)
    worded = [p[p.rindex(". ") + 2:] for p, _ in rows[2::2]]  # what follows the generic sentence
    assert len(set(worded)) == 3 and known.prompt not in worded
    assert all(question(w, "Danielle Darrieux") == question(known.prompt, "Danielle Darrieux") for w in worded)
    assert all(p.endswith(" " + unknown.prompt) for p, _ in rows[3::2])
    assert [t for _, t in rows] == ["English", "Bob"] * 4

    asked = EditRequest("Which family does Epaspidoceras belong to?", "Noctuidae", subject="Epaspidoceras")
    rows = with_context([asked], 3, seed=0)
    assert {p[p.rindex(". ") + 2:] for p, _ in rows[1:]} == {
        "Epaspidoceras belongs to the family", "Epaspidoceras is a member of the family", "The family of Epaspidoceras is"}
