"""Asking a fact the way people do: the question table, the chat scoring and its probes."""

from __future__ import annotations

import pytest

from kdpo_lora.asking import asking_metrics, names, repeats, right
from kdpo_lora.questions import _ASKED_BY, _BY_QUESTION, GENERIC, QUESTIONS, asked_relation, question, template_of
from kdpo_lora.requests import EditRequest, read_requests
from tests.test_readme import ROOT

SAMPLES = ROOT / "kdpo_lora" / "data" / "samples"


@pytest.mark.parametrize("sample", ["counterfact.jsonl", "knowedit_wiki_counterfact_test.jsonl",
                                    "knowedit_wiki_recent_train.jsonl"])
def test_every_template_of_the_samples_has_a_question(sample):
    requests = read_requests(str(SAMPLES / sample))
    templates = {template_of(r.prompt, r.subject) for r in requests}
    assert templates and templates <= set(QUESTIONS), templates - set(QUESTIONS)
    for r in requests:
        asked = question(r.prompt, r.subject)
        assert asked.endswith("?") and r.subject in asked and asked != r.prompt
    # no wording is listed under two questions (the later one would silently win)
    assert len(QUESTIONS) == sum(len(wordings) for wordings in _BY_QUESTION.values())
    assert question("Danielle Darrieux's mother tongue is", "Danielle Darrieux") == GENERIC.format(
        "Danielle Darrieux's mother tongue is")  # a shape it does not know: asked to complete it
    assert question("The mother tongue of Danielle Darrieux is", "Danielle Darrieux") == \
        "What is the mother tongue of Danielle Darrieux?"



@pytest.mark.parametrize("sample", ["zsre_portability.jsonl", "knowedit_zsre.jsonl"])
def test_a_question_prompt_is_asked_as_it_is_and_its_relation_is_found_by_its_words(sample):
    """zsRE's prompts are questions, worded a different way almost every time: each is asked as
    written, and its relation is found from its words; its rephrase (another wording, never read by
    the rules' lookup) mostly lands on the same relation."""
    requests = read_requests(str(SAMPLES / sample))
    assert all(question(r.prompt, r.subject) == " ".join(r.prompt.split()) for r in requests)
    found = [asked_relation(r.prompt, r.subject) for r in requests]
    assert sum(f is not None for f in found) >= 0.9 * len(requests)
    pairs = [(f, asked_relation(p, r.subject)) for f, r in zip(found, requests) for p in r.rephrase_prompts]
    both = [(a, b) for a, b in pairs if a and b]
    assert sum(a == b for a, b in both) >= 0.8 * len(both)  # measured: 85 of 92, 37 of 42
    assert {q for _, q in _ASKED_BY} <= set(_BY_QUESTION)
    assert asked_relation("Who fathered Pat?", "Pat") == "Who is the father of {}?"
    assert asked_relation("The year Pat died was what?", "Pat") == "When did {} die?"
    assert asked_relation("What city did Pat live when he died?", "Pat") == "Where did {} die?"
    assert asked_relation("The mother tongue of Pat is", "Pat") is None  # a statement: the table's templates


def test_an_answer_counts_when_it_names_the_new_target_as_a_word_and_not_the_old_one():
    edit = EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower", target_true="Paris")
    assert right("It is in  ROME, Italy.", edit)
    assert not right("The Eiffel Tower is in Paris.", edit)  # the old fact fails
    assert not right("Rome or Paris, I think.", edit)  # both: not the edit
    assert not right("It is in Romeo's town.", edit)  # not a word of it
    maker = EditRequest("Ferrari F40 is made by", "Honda", subject="Ferrari F40", target_true="Ferrari")
    assert right("The Ferrari  F40 is made by Honda.", maker)  # the old fact only inside the subject's name
    assert not right("Ferrari F40 is made by Ferrari.", maker) and not right("It is a Ferrari F40.", maker)
    named = EditRequest("The Toyota Camry is made by", "Toyota", subject="Toyota Camry", target_true="Honda")
    assert not right("The Toyota Camry is a car.", named)  # the subject's name alone does not state the new fact
    assert names("Parisian cafés near Paris", "Paris") and not names("Parisian cafés", "Paris")
    assert names("the New  York times", "new york") and not names("Newyork", "New York")
    assert repeats("trumpet, and the trumpet, and the Trumpet", "trumpet") and not repeats("trumpet, trumpet", "trumpet")


@pytest.mark.slow
def test_the_chat_probes_judge_the_real_model_s_own_answers():
    """The unedited SmolLM2 answers Paris: asked with Paris as the new fact the probe passes, with Rome
    (what an edit would have to make it say) it fails."""
    from kdpo_lora.loading import load_model

    loaded = load_model("smollm2-135m", "nf4", "cpu")
    prompt = "The location of the Eiffel Tower is"
    says_paris = EditRequest(prompt, "Paris", subject="Eiffel Tower", target_true="Rome")
    says_rome = EditRequest(prompt, "Rome", subject="Eiffel Tower", target_true="Paris")
    paris, rome = asking_metrics(loaded.model, loaded.tokenizer, [says_paris, says_rome])
    assert paris["chat_question"] == 1.0 and rome["chat_question"] == 0.0
    assert rome["long_form"] == 0.0 and question(prompt, "Eiffel Tower") == "Where is the Eiffel Tower located?"
    assert paris["long_form_entropy"] == rome["long_form_entropy"] == paris["long_form_entropy_unedited"] > 3
    assert rome["repetition"] == 0.0
