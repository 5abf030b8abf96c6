"""The question a person would ask for a fact stated as a CounterFact-style prompt.

Edits are made and benchmarked on sentence starts ("The mother tongue of Danielle Darrieux is"),
but people ask questions, through the chat template ("What is the mother tongue of Danielle
Darrieux?"). `question(prompt, subject)` turns the one into the other: every prompt template of
CounterFact (the prompt with its subject taken out: 218 in the public file, several per relation)
and of KnowEdit's WikiData sets ("The name of the spouse of {} is": 40) has its question here, next
to a few plain wordings of those relations; a prompt that already is a question (zsRE's) is asked
as written, its relation found by its words (`_ASKED_BY`); a prompt of another shape gets a generic
instruction to complete it. Some templates do not name their relation ("{}, the" is an instrument
or a playing position); their questions are worded to fit each relation they are used for.
"""

from __future__ import annotations

import re

_BY_QUESTION: dict[str, tuple[str, ...]] = {
    "What is an official language of {}?": ("In {}, an official language is",),
    "What language is spoken in {}?": ("In {}, the language spoken is",),
    "What language do people understand in {}?": ("In {}, they understand",),
    "What is the official language of {}?": ("The official language of {} is", "The law in {} declares the language"),
    "What is the language of {}?": ("The language of {} is", "The language of {} was", "The language used by {} is"),
    "What is the mother tongue of {}?": ("The mother tongue of {} is", "The native language of {} is",
                                         "{} is a native speaker of", "{}, a native"),
    "What is the original language of {}?": ("The original language of {} is", "The original language of {} was",
                                             "{} is written in", "{} was written in"),
    "What language does {} speak?": ("{} speaks", "{} speaks the language", "{} spoke the language", "{}, speaker of"),
    "What language does {} write in?": ("{} writes in",),
    "What is the capital of {}?": ("The capital city of {} is", "The capital of {} is", "{}'s capital city is",
                                   "{}'s capital city,", "{}'s capital is", "{}'s capital,",
                                   "{}, which has the capital", "{}, which has the capital city",
                                   "The name of the capital city of {} is"),
    "What field does {} work in?": ("The domain of activity of {} is", "The domain of work of {} is",
                                    "The expertise of {} is", "{} specializes in", "{} works in the area of",
                                    "{} works in the field of", "{}'s area of work is", "{}'s domain of activity is",
                                    "{}'s domain of work is", "{}'s expertise is",
                                    "The name of the field of work of {} is", "The field of work of {} is"),
    "What kind of music does {} play?": ("The genre played by {} is", "{} is known for performing"),
    "Where is {} headquartered?": ("The headquarter of {} is in", "The headquarter of {} is located in",
                                   "The headquarters of {} is in", "{} is headquartered in", "{}'s headquarters are in",
                                   "{}, whose headquarters are in", "{} is based in"),
    "Where is {} located?": ("The location of {} is", "Where is {}? It is located in", "{} can be found in",
                             "{} is located in", "{} is in", "{} is within", "{}, located in", "{}, which is located in",
                             "{}, in", "{} is a part of the"),
    "On which continent is {}?": ("{} belongs to the continent of", "{} is a part of the continent of",
                                  "{} is located in the continent", "The name of the continent which {} is part of is"),
    "In which country is {}?": ("{} is located in the country of", "{}, of"),
    "What is the twin city of {}?": ("The twin city of {} is", "What is the twin city of {}? It is",
                                     "{} is a twin city of"),
    "What is the occupation of {}?": ("The occupation of {} is", "The profession of {} is", "{} works as",
                                      "{}, who works as", "{}'s occupation is", "{}'s profession is a",
                                      "{}'s profession is an", "{} is a professional", "{} is a"),
    "Which record label is {} signed to?": ("The music label representing {} is",
                                            "The music label that is representing {} is", "{} is represented by",
                                            "{} is represented by music label", "{} is represented by record label",
                                            "{} label :", "{} recorded for", "{}'s label is", "{}'s music label is",
                                            "{}'s record company is", "{}'s record label is", "{}, released by",
                                            "{}, that is represented by", "{}, which is represented by"),
    "What religion does {} follow?": ("The official religion of {} is", "{} follows the religion of",
                                      "{} is affiliated with the religion", "{} is follower of",
                                      "The name of the religion which {} is associated with is"),
    "What sport does {} play?": ("What sport does {} play? They play", "{} professionally plays the sport"),
    "What does {} play?": ("What does {} play? They play", "{} plays", "{}, who plays", "{} plays the", "{}, the",
                           "{} performs"),
    "What instrument does {} play?": ("{} plays the instrument", "{} performs on the", "{}, performing on the",
                                      "{}, playing the"),
    "What position does {} play?": ("Which position does {} play? They play as", "{} plays as",
                                    "{} plays in the position of", "{}, who plays the position"),
    "What position does {} hold?": ("{} has the position of", "{} holds the position of", "{} holds the title of",
                                    "{}, who has the position of", "{}, who holds the position of", "{}'s position is",
                                    "{}, whose position is that of", "The name of the position held by {} is",
                                    "The position held by {} is"),
    "Which country is {} a citizen of?": ("{} has a citizenship from", "{} holds a citizenship from",
                                          "{} is a citizen of", "{}, a citizen of", "{}, who has a citizenship from",
                                          "{}, who holds a citizenship from", "{}, who is a citizen of",
                                          "The name of the country of citizenship of {} is",
                                          "The country of citizenship of {} is", "{}'s country of citizenship is"),
    "Where does {} come from?": ("{} was created in the country of", "{} was created in", "{}, created in",
                                 "{}, that was created in", "{} was developed in", "{}, developed in",
                                 "{}, that was developed in", "{} formed in", "{} was formed in", "{}, that was formed in",
                                 "{} was formulated in", "{}, formulated in", "{}, that was formulated in",
                                 "{} was founded in", "{}, founded in", "{} that was founded in", "{} originated in",
                                 "{}, that originated in", "{} started in", "{} was started in", "{}, that was started in",
                                 "{} originated from", "{} originates from", "{} is from", "{} was from",
                                 "{}, that was from", "{}, from", "{} from", "{} is native to", "{} was native to",
                                 "{} is originally from", "{} was originally from"),
    "Where did {} die?": ("{} died at", "{} died in", "{} died in the city of", "{} expired at",
                          "{} lost their life at", "{} passed away at", "{} passed away in", "{} succumbed at",
                          "{}'s life ended in", "The place of death of {} is", "{}'s place of death is"),
    "Where was {} born?": ("{} was born in", "The place of birth of {} is", "{}'s place of birth is",
                           "{}'s birthplace is"),
    "In which city did {} work?": ("{} found employment in", "{} took up work in", "{} used to work in",
                                   "{} was employed in", "{} worked in", "{} worked in the city of"),
    "Who does {} work for?": ("{} is employed by", "{} works for", "{}, who is employed by", "{}, who works for",
                              "The name of the employer of {} is", "The employer of {} is", "{}'s employer is"),
    "Which organization is {} a member of?": ("{} is a member of", "{} belongs to the organization of",
                                              "{} is affiliated with", "{} is affiliated with the"),
    "Which company makes {}?": ("{} is created by", "{} is developed by", "{} is produced by", "{} was created by",
                                "{} was developed by", "{}, created by", "{}, developed by", "{}, produced by",
                                "{} is a product of", "{} was a product of", "{}, a product of",
                                "{}, a product created by", "{}, a product developed by", "{}, a product manufactured by",
                                "{}, by"),
    "Who owns {}?": ("{} is owned by", "{} owner", "{}'s owner"),
    "On which network did {} first air?": ("{} debuted on", "{} is to debut on", "{} premiered on", "{} premieres on",
                                           "{} was originally aired on", "{} was released on"),
    "What is {} named after?": ("{} is called after", "{} is named after", "{} is named for", "{} was called after",
                                "{} was named after", "{} was named for", "{}, called after", "{}, named after",
                                "{}, named for", "{}, which is called after", "{}, which is named after",
                                "{}, which is named for", "{}, which was called after", "{}, which was named after",
                                "{}, which was named for"),
    # KnowEdit's WikiData templates ("The name of the ... of {} is") and their relations
    "Where is {} buried?": ("The place of burial of {} is", "{} is buried in", "{} was buried in",
                            "{}'s burial place is"),
    "Which country is {} associated with?": ("The name of the country which {} is associated with is",
                                             "The country {} is associated with is",
                                             "{} is associated with the country of"),
    "What is the gender of {}?": ("The gender of {} is", "{}'s gender is", "{} is of the gender"),
    "What award did {} win?": ("The name of the award {} won is", "{} won the award", "{} received the award",
                               "{} was awarded the"),
    "Who composed {}?": ("The name of the composer of {} is", "The composer of {} is", "{} was composed by",
                         "{}, composed by"),
    "What does {} follow?": ("{} follows", "{} comes after", "{} is preceded by"),
    "What follows {}?": ("{} is followed by", "{} was followed by", "{} is succeeded by"),
    "Who is a sibling of {}?": ("The names of the siblings of {} are", "The sibling of {} is", "{}'s sibling is",
                                "{} is a sibling of"),
    "Who is a child of {}?": ("The name of the child of {} is", "The child of {} is", "{}'s child is",
                              "{} is the parent of"),
    "Who is in the cast of {}?": ("The names of the cast members of {} are", "The cast of {} includes", "{} stars"),
    "Who is the spouse of {}?": ("The name of the spouse of {} is", "The spouse of {} is", "{} is married to",
                                 "{}'s spouse is"),
    "Who is the mother of {}?": ("The name of the mother of {} is", "The mother of {} is", "{}'s mother is"),
    "Who is the father of {}?": ("The name of the father of {} is", "The father of {} is", "{}'s father is"),
    "Which team does {} play for?": ("The name of the sports team which {} is a member of is", "{} plays for",
                                     "{} is a player of the team"),
    "Who directed {}?": ("The name of the director of {} is", "The director of {} is", "{} was directed by",
                         "{}, directed by"),
    "Who wrote the screenplay of {}?": ("The name of the screenwriter of {} is", "The screenwriter of {} is",
                                        "The screenplay of {} was written by"),
    "Who wrote {}?": ("The name of the author of {} is", "The author of {} is", "{} was written by", "{}, written by"),
    "Which league does {} play in?": ("The name of the league which {} plays in is", "{} plays in the league",
                                      "The league of {} is"),
    "Which ethnic group is {} associated with?": ("The name of the ethnic group which {} is associated with is",
                                                  "The ethnic group of {} is", "{}'s ethnicity is"),
    "What is the anthem of {}?": ("The name of the anthem of {} is", "The anthem of {} is", "{}'s anthem is"),
    "What is the sexual orientation of {}?": ("The sexual orientation of {} is", "{}'s sexual orientation is"),
    "What is the eye color of {}?": ("The eye color of {} is", "{}'s eye color is", "{}'s eyes are"),
    "Who is the head of state of {}?": ("The name of the head of state of {} is", "The head of state of {} is",
                                        "{}'s head of state is"),
    "When was {} born?": ("The date of birth of {} is", "{} was born on", "{}'s date of birth is"),
    "Which country is {} the capital of?": ("The name of the country which {} is the capital of is",
                                            "{} is the capital of", "{} is the capital city of"),
    "Where did {} study?": ("The name of the alma mater of {} is", "The alma mater of {} is", "{} studied at",
                            "{} graduated from"),
    "How many children does {} have?": ("The number of children {} has is", "The number of children of {} is"),
    "What is the currency of {}?": ("The name of the currency in {} is", "The currency of {} is", "{}'s currency is"),
    "Who designed {}?": ("The name of the architect of {} is", "The architect of {} is", "{} was designed by"),
    # relations that zsRE asks and the tables above lack (zsRE's prompts are questions: `_ASKED_BY`)
    "Which constellation is {} part of?": ("{} is part of the constellation", "{} is in the constellation of",
                                          "The constellation of {} is"),
    "Which family does {} belong to?": ("{} belongs to the family", "{} is a member of the family",
                                        "The family of {} is"),
    "When did {} die?": ("{} died on", "The date of death of {} is", "{}'s date of death is"),
    "What did {} die of?": ("{} died of", "The cause of death of {} was", "{}'s cause of death was"),
    "Which war did {} fight in?": ("{} fought in", "{} took part in", "{} served in"),
    "What voice type does {} have?": ("The voice type of {} is", "{}'s voice type is", "{} sings as a"),
    "When did {} enter service?": ("{} entered service in", "{} was put into service in", "{} came into service in"),
    "When was {} launched?": ("{} was launched on", "The launch date of {} is", "{} launched on"),
    "When was {} founded?": ("{} was established in", "The inception of {} was in", "{} was first set up in"),
    "When was {} released?": ("The release date of {} is", "{} came out in", "{} was first published in"),
    "Who discovered {}?": ("{} was discovered by", "The discoverer of {} is", "{}'s discoverer is"),
    "Which fictional universe is {} from?": ("{} is from the fictional universe of",
                                            "{} appears in the fictional universe of", "The fictional universe of {} is"),
    "Which industry is {} in?": ("{} works in the industry of", "The industry of {} is",
                                 "{} is active in the industry of"),
    "What is the conservation status of {}?": ("The conservation status of {} is", "{} is listed as",
                                               "{}'s conservation status is"),
    "In which species is {} found?": ("{} is found in the species", "{} is a gene of", "{} occurs in the species"),
    "Into which body of water does {} flow?": ("{} flows into", "The mouth of {} is in", "{} empties into"),
    "Which series is {} part of?": ("{} is part of the series", "{} belongs to the series", "The series of {} is"),
    "Who published {}?": ("{} was published by", "The publisher of {} is", "{} is published by"),
    "What was {} nominated for?": ("{} was nominated for", "{} received a nomination for",
                                   "{}'s nomination was for"),
    "Which political party does {} belong to?": ("{} is a member of the political party", "{} belongs to the party",
                                                 "The political party of {} is"),
    "Which programming language is {} written in?": ("{} is written in the programming language",
                                                     "The programming language of {} is", "{} was programmed in"),
    "When was {} discovered?": ("{} was discovered in", "The discovery of {} was in", "{} was first described in"),
    "When did {} end?": ("{} ended in", "{} was dissolved in", "{} ceased to exist in"),
    "When did {} take place?": ("{} took place in", "{} happened in", "The date of {} is"),
    "What medical condition does {} have?": ("{} suffers from", "{} was diagnosed with",
                                             "The medical condition of {} is"),
    "Which chromosome is {} on?": ("{} is located on chromosome", "{} is on chromosome", "The chromosome of {} is"),
    "Which mountain range is {} part of?": ("{} is part of the mountain range", "{} lies in the range of",
                                            "The mountain range of {} is"),
    "Who performed {}?": ("{} was performed by", "{} was recorded by", "The performer of {} is"),
    "Who illustrated {}?": ("{} was illustrated by", "The illustrator of {} is", "{}'s illustrator is"),
    "Which airport is {} associated with?": ("The airport of {} is", "{} is served by the airport", "{}'s airport is"),
    "On which planet is {}?": ("{} is on the planet", "{} is located on", "{} can be found on the planet"),
    "Which work does {} appear in?": ("{} appears in", "{} is a character in", "{} first appeared in"),
    "What is the license of {}?": ("{} is released under the license", "The license of {} is", "{} is licensed under"),
    "What is {} made of?": ("{} is made of", "{} is made from", "The material of {} is"),
    "What is {} based on?": ("{} is based on", "{} was based on", "The basis of {} is"),
    "What does {} cross?": ("{} crosses", "{} spans", "{} goes over"),
}
# A question prompt (zsRE's "Who fathered {}?") is matched to its relation by its words, not its exact
# template: zsRE words each relation dozens of ways and mostly once. The first pattern that matches
# the question (lowercased, subject taken out) names the table's question; order matters ("when ...
# die" before "die").
_WHEN = r"(when|\byear|date|what day|which day)"
_ASKED_BY: tuple[tuple[str, str], ...] = (
    (r"programming language", "Which programming language is {} written in?"),
    (r"employ|work(ed|s)? for|place of work|work ?place", "Who does {} work for?"),
    (r"\bmother\b|\bmom\b|(gave|give|given) birth|(lady|woman|girl|wife).*\bborn\b|born (to|for|by)\b",
     "Who is the mother of {}?"),
    (r"\bfather|\bdad\b", "Who is the father of {}?"),
    (r"\bsister|\bbrother|sibling", "Who is a sibling of {}?"),
    (r"spouse|married|\bwife\b|\bhusband\b", "Who is the spouse of {}?"),
    (r"constellation", "Which constellation is {} part of?"),
    (r"\bfamily\b|parent taxon", "Which family does {} belong to?"),
    (r"(cause|illness|disease|condition|reason|accident|suicide|how).*(death|\bdie)|\bkill"
     r"|(death|\bdie).*(cause|illness|disease|condition|reason|accident|suicide)|die[ds]? (of|from)",
     "What did {} die of?"),
    (r"(where|city|town|place|location|country).*(death|\bdie)|(death|\bdie).*(where|city|town|place|location)",
     "Where did {} die?"),
    (_WHEN + r".*(death|\bdie)|(death|\bdie).*" + _WHEN, "When did {} die?"),
    (r"death|\bdie", "Where did {} die?"),
    (_WHEN + r".*(birth|born)|(birth|born).*" + _WHEN, "When was {} born?"),
    (r"birth|born", "Where was {} born?"),
    (r"\blabel\b|record company", "Which record label is {} signed to?"),
    (r"\bwars?\b|battle|conflict|\bfight", "Which war did {} fight in?"),
    (r"voice|vocal", "What voice type does {} have?"),
    (r"illness|disease|medical condition|suffer", "What medical condition does {} have?"),
    (r"chromosome", "Which chromosome is {} on?"),
    (r"\bsex\b|gender|male or female", "What is the gender of {}?"),
    (r"instrument", "What instrument does {} play?"),
    (r"programming|operating system", "Which programming language is {} written in?"),
    (r"dissol|ceased|\bend(ed|ing|s)?\b|final year|expire|abolish", "When did {} end?"),
    (r"service|come into use|came into use|commissioned|introduced", "When did {} enter service?"),
    (_WHEN + r".*discover|discover.*" + _WHEN, "When was {} discovered?"),
    (r"launch", "When was {} launched?"),
    (r"inception|" + _WHEN + r".*(found|establish|creat|start|form|originat|come into being)", "When was {} founded?"),
    (_WHEN + r".*(releas|publish|came out)", "When was {} released?"),
    (r"occur|take place|took place|happen|point in time|^(when|what year|which year|in what year|in which year"
     r"|what was the date|the date)\b", "When did {} take place?"),
    (r"species|living (being|creature)|organism|\bgene\b", "In which species is {} found?"),
    (r"discover", "Who discovered {}?"),
    (r"universe", "Which fictional universe is {} from?"),
    (r"industry", "Which industry is {} in?"),
    (r"conservation|endangered|iucn|status", "What is the conservation status of {}?"),
    (r"river|body of water|\bflows?\b|mouth", "Into which body of water does {} flow?"),
    (r"\brange\b|mountain", "Which mountain range is {} part of?"),
    (r"airport", "Which airport is {} associated with?"),
    (r"planet|celestial|astronomical|\bmoon\b", "On which planet is {}?"),
    (r"fiction|appear(s|ed)? in|appearance", "Which work does {} appear in?"),
    (r"licen[cs]e", "What is the license of {}?"),
    (r"material|made (of|from)", "What is {} made of?"),
    (r"based (on|upon)|basis", "What is {} based on?"),
    (r"\bcross", "What does {} cross?"),
    (r"illustrat", "Who illustrated {}?"),
    (r"perform|\bsang\b|\bsinger\b|released the album", "Who performed {}?"),
    (r"\bseries\b", "Which series is {} part of?"),
    (r"publish", "Who published {}?"),
    (r"nominat", "What was {} nominated for?"),
    (r"award|prize|\bwon\b|\bwin\b", "What award did {} win?"),
    (r"university|college|school|educated|attend|alma mater|\bstud(y|ied)", "Where did {} study?"),
    (r"architect|design", "Who designed {}?"),
    (r"direct", "Who directed {}?"),
    (r"\bcast\b|\bstars?\b|\bstarr|actor|actress", "Who is in the cast of {}?"),
    (r"compos", "Who composed {}?"),
    (r"author|\bwrote\b|written by|writer", "Who wrote {}?"),
    (r"develop|manufactur|produc|company|\bmade\b|\bmakes?\b|creat|\bbuil", "Which company makes {}?"),
    (r"named", "What is {} named after?"),
    (r"\bteam\b|\bclub\b", "Which team does {} play for?"),
    (r"league", "Which league does {} play in?"),
    (r"position.*play|play.*position", "What position does {} play?"),
    (r"position|\boffice\b|\btitle\b", "What position does {} hold?"),
    (r"\bsport", "What sport does {} play?"),
    (r"\bparty\b", "Which political party does {} belong to?"),
    (r"language", "What is the language of {}?"),
    (r"occupation|profession|\bjob\b|career", "What is the occupation of {}?"),
    (r"citizen|nationality", "Which country is {} a citizen of?"),
    (r"network|channel|\baired\b|broadcast", "On which network did {} first air?"),

    (r"\bowns?\b|owner|owned", "Who owns {}?"),
    (r"religio", "What religion does {} follow?"),
    (r"capital", "What is the capital of {}?"),
    (r"continent", "On which continent is {}?"),
    (r"country", "In which country is {}?"),
    (r"state|province|county|city|town|region|district|locat|where|place|territor|village", "Where is {} located?"),
)
QUESTIONS: dict[str, str] = {template: q for q, templates in _BY_QUESTION.items() for template in templates}
GENERIC = "Complete the sentence: {}"


def template_of(prompt: str, subject: str) -> str | None:
    """The prompt with its subject taken out ("{} was born in"); None if it does not name it."""
    prompt = " ".join(prompt.split())
    return prompt.replace(subject, "{}", 1) if subject and subject in prompt else None


def asked_relation(prompt: str, subject: str) -> str | None:
    """The table's question for the relation a question prompt asks (`_ASKED_BY`); None for a
    prompt that is not a question or whose words match no relation."""
    template = template_of(prompt, subject)
    if not template or not template.endswith("?"):
        return None
    words = template.lower()
    return next((q for pattern, q in _ASKED_BY if re.search(pattern, words)), None)


def other_wordings(prompt: str, subject: str) -> list[str]:
    """The prompt's fact in the table's other wordings of its question, filled with the subject
    ("The mother tongue of X is" -> "The native language of X is", "X, a native", ...; a question
    prompt also gets the table's question); none for a prompt the table does not know."""
    template = template_of(prompt, subject)
    if template in QUESTIONS:
        return [t.format(subject) for t in _BY_QUESTION[QUESTIONS[template]] if t != template]
    asked = asked_relation(prompt, subject)
    if asked is None:
        return []
    return [t.format(subject) for t in (asked, *_BY_QUESTION[asked]) if t != template]


def question(prompt: str, subject: str) -> str:
    """The question a person would ask for the fact `prompt` starts to state (a question: itself)."""
    prompt = " ".join(prompt.split())
    if prompt.endswith("?"):
        return prompt
    template = template_of(prompt, subject)
    for shape in (template, template and template.replace("the {}", "{}").replace("The {}", "{}")):
        if shape in QUESTIONS:  # "The location of the {} is": the table's "{}" stands for "the Eiffel Tower" too
            return QUESTIONS[shape].format(subject if shape == template else "the " + subject)
    return GENERIC.format(prompt)
