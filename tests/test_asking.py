"""Asking a fact the way people do: the question table, the chat scoring and its probes."""

from __future__ import annotations

import pytest

from kdpo_lora.asking import asking_metrics, names, repeats, right
from kdpo_lora.questions import _BY_QUESTION, GENERIC, QUESTIONS, question, template_of
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


def test_an_answer_counts_when_it_names_the_new_target_as_a_word_and_not_the_old_one():
    edit = EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower", target_true="Paris")
    assert right("It is in  ROME, Italy.", edit)
    assert not right("The Eiffel Tower is in Paris.", edit)  # the old fact fails
    assert not right("Rome or Paris, I think.", edit)  # both: not the edit
    assert not right("It is in Romeo's town.", edit)  # not a word of it
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
