"""Guards (guards.py): generic-text prompts where an edit's tokens are at stake, held at the unedited answers."""

from __future__ import annotations

import torch

from kdpo_lora import objectives as obj
from kdpo_lora.config import EditConfig
from kdpo_lora.editor import Editor
from kdpo_lora import guards
from kdpo_lora.guards import MIN_CONTEXT, TOP, WINDOW, GuardPool, guard_pool, score_pool
from kdpo_lora.loading import prepare_model
from kdpo_lora.requests import EditRequest

from conftest import make_model

TEXTS = [
    "the capital of france is paris and the capital of italy is rome and the capital of spain is madrid",
    "the official language of germany is german and the official language of japan is japanese",
    "the eiffel tower is located in paris and the colosseum is located in rome on the tiber",
    "london is the capital of england and the thames is the river of london and big ben is in london",
    "the prado museum is in madrid and mount fuji is in japan and the seine is the river of paris",
]


def _pool(rows: list[list[tuple[int, float, int, float]]]) -> GuardPool:
    """A pool of one window per row, token 100 + i at position i, each position given as (top-1 id,
    its log-prob, runner-up id, its log-prob)."""
    windows = torch.full((len(rows), WINDOW), -1, dtype=torch.long)
    top_ids = torch.zeros((len(rows), WINDOW, TOP), dtype=torch.long)
    top_log_probs = torch.full((len(rows), WINDOW, TOP), -30.0)
    for w, row in enumerate(rows):
        for i, (first, first_lp, second, second_lp) in enumerate(row):
            windows[w, i] = 100 + i
            top_ids[w, i, :2] = torch.tensor([first, second])
            top_ids[w, i, 2:] = torch.arange(90, 90 + TOP - 2)
            top_log_probs[w, i, :2] = torch.tensor([first_lp, second_lp])
    return GuardPool(windows, top_ids, top_log_probs)


def test_guards_are_the_narrowest_leads_of_the_moved_tokens():
    filler = [(1, -0.1, 2, -5.0)] * MIN_CONTEXT
    pool = _pool([
        filler + [(7, -0.5, 3, -0.9), (1, -0.1, 8, -2.0), (7, -0.2, 4, -3.0)],
        [(7, -0.5, 3, -0.6)] * (MIN_CONTEXT - 1) + filler,  # too little context before them: never picked
        filler + [(7, -0.5, 3, -0.9)],  # the same text as the first window's: picked once
    ])
    picked = pool.pick(pushed_down=[7], pulled_up=[8], count=3)
    # token 7 leads by 0.4 at position 4, then 8 trails by 1.9 at 5, then 7 leads by 2.8 at 6
    assert picked == [list(range(100, 100 + n)) for n in (MIN_CONTEXT + 1, MIN_CONTEXT + 2, MIN_CONTEXT + 3)]
    assert pool.pick(pushed_down=[7], pulled_up=[8], count=10) == picked  # nothing else is at stake
    assert pool.pick(pushed_down=[5], pulled_up=[6], count=3) == []
    assert pool.pick(pushed_down=[7], pulled_up=[8], count=0) == []


def test_the_pool_holds_the_unedited_models_top_tokens_per_window(tiny_model, tokenizer):
    pool = score_pool(tiny_model, tokenizer, TEXTS, progress=False)
    ids = tokenizer(TEXTS[0], add_special_tokens=False).input_ids[:WINDOW]
    with torch.no_grad():
        log_probs = torch.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert pool.windows[0, : len(ids)].tolist() == ids
    torch.testing.assert_close(pool.top_log_probs[0, : len(ids)], log_probs.topk(TOP, -1).values, atol=1e-4, rtol=0)
    assert (pool.top_ids[0, : len(ids), 0] == log_probs.argmax(-1)).all()


def test_the_pool_is_scored_once_per_model_and_rescored_when_damaged(tiny_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    scored = []
    monkeypatch.setattr(guards, "score_pool", lambda *a, **k: scored.append(1) or score_pool(*a, **k))
    first = guard_pool(tiny_model, tokenizer, TEXTS, progress=False)
    again = guard_pool(tiny_model, tokenizer, TEXTS, progress=False)
    assert len(scored) == 1 and all(torch.equal(a, b) for a, b in zip(vars(first).values(), vars(again).values()))
    guard_pool(tiny_model, tokenizer, TEXTS[:2], progress=False)  # other texts: another entry
    assert len(scored) == 2
    (entry,) = [p for p in (tmp_path / "guards").iterdir() if p.stat().st_size == max(
        q.stat().st_size for q in (tmp_path / "guards").iterdir())]
    entry.write_bytes(b"damaged")
    rescored = guard_pool(tiny_model, tokenizer, TEXTS, progress=False)
    assert len(scored) == 3 and torch.equal(rescored.top_ids, first.top_ids)


def test_an_edit_with_guards_moves_them_less(tokenizer):
    """The guards an edit picks keep the unedited answers closer with `guards` on than with it off."""
    request = EditRequest("the capital of japan is", "rome", subject="japan")
    drift, successes = {}, {}
    for guards in (0, 8):
        model = prepare_model(make_model())
        editor = Editor(model, tokenizer, EditConfig(learning_rate=5e-3, beta=1.0, preserve_weight=5.0,
                                                     preserve_prompts=1, guards=guards, null_space_samples=0))
        editor._guard_pools[0] = score_pool(model, tokenizer, TEXTS, progress=False)
        batch = editor.encode([request.prompt], [request.target_new], 64)
        with torch.no_grad():
            probes = editor._guards(batch, EditConfig(preserve_weight=1.0, guards=8, null_space_samples=0), 1,
                                    progress=False)
            input_ids, attention_mask = obj.left_pad(probes, tokenizer.pad_token_id, "cpu")
            before = obj.next_token_log_probs(model, input_ids, attention_mask)
        assert len(probes) == 8
        successes[guards] = editor.edit([request], progress=False).results[0].success
        with torch.no_grad():
            after = obj.next_token_log_probs(editor.model, input_ids, attention_mask)
        drift[guards] = float(obj.preservation_kl(after, before))
    assert successes == {0: True, 8: True}
    assert drift[8] < 0.5 * drift[0]
