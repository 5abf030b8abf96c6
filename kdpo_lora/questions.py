"""The question a person would ask for a fact stated as a CounterFact-style prompt.

Edits are made and benchmarked on sentence starts ("The mother tongue of Danielle Darrieux is"),
but people ask questions, through the chat template ("What is the mother tongue of Danielle
Darrieux?"). `question(prompt, subject)` turns the one into the other: every prompt template of
CounterFact (the prompt with its subject taken out: 218 in the public file, several per relation)
and of KnowEdit's WikiData sets ("The name of the spouse of {} is": 40) has its question here, next
to a few plain wordings of those relations; a prompt of another shape gets a generic instruction to
complete it. Some templates do not name their relation ("{}, the" is an instrument or a playing
position); their questions are worded to fit each relation they are used for.
"""

from __future__ import annotations

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
}
QUESTIONS: dict[str, str] = {template: q for q, templates in _BY_QUESTION.items() for template in templates}
GENERIC = "Complete the sentence: {}"


def template_of(prompt: str, subject: str) -> str | None:
    """The prompt with its subject taken out ("{} was born in"); None if it does not name it."""
    prompt = " ".join(prompt.split())
    return prompt.replace(subject, "{}", 1) if subject and subject in prompt else None


def other_wordings(prompt: str, subject: str) -> list[str]:
    """The prompt's fact in the table's other wordings of its question, filled with the subject
    ("The mother tongue of X is" -> "The native language of X is", "X, a native", ...); none for a
    prompt whose template the table lacks."""
    template = template_of(prompt, subject)
    if template not in QUESTIONS:
        return []
    return [t.format(subject) for t in _BY_QUESTION[QUESTIONS[template]] if t != template]


def question(prompt: str, subject: str) -> str:
    """The question a person would ask for the fact `prompt` starts to state."""
    template = template_of(prompt, subject)
    for shape in (template, template and template.replace("the {}", "{}").replace("The {}", "{}")):
        if shape in QUESTIONS:  # "The location of the {} is": the table's "{}" stands for "the Eiffel Tower" too
            return QUESTIONS[shape].format(subject if shape == template else "the " + subject)
    return GENERIC.format(" ".join(prompt.split()))
