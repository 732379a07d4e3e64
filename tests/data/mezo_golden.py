"""Golden rows per MeZO task: a row, MeZO's verbalized text for each candidate, and the gold.

Checked by eye against MeZO's templates (large_models/templates.py), then frozen. Shared by the
template and builder tests.
"""

GOLDEN = {
    "sst2": (
        {"sentence": "it 's a charming and often affecting journey . ", "label": 1},
        ["it 's a charming and often affecting journey . It was terrible", "it 's a charming and often affecting journey . It was great"],
        1,
    ),
    "rte": (
        {"premise": "No Weapons of Mass Destruction Found in Iraq Yet.", "hypothesis": "Weapons of Mass Destruction Found in Iraq.", "label": 1},
        [
            'No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that "Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\nYes',
            'No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that "Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\nNo',
        ],
        1,
    ),
    "cb": (
        {"premise": "It was a complex language. Not written down but handed down.", "hypothesis": "the language was peeled down", "label": 0},
        [
            'Suppose It was a complex language. Not written down but handed down. Can we infer that "the language was peeled down"? Yes, No, or Maybe?\nYes',
            'Suppose It was a complex language. Not written down but handed down. Can we infer that "the language was peeled down"? Yes, No, or Maybe?\nNo',
            'Suppose It was a complex language. Not written down but handed down. Can we infer that "the language was peeled down"? Yes, No, or Maybe?\nMaybe',
        ],
        0,
    ),
    "boolq": (
        {"question": "does ethanol take more energy make that produces", "passage": "All biomass goes through at least some of these steps.", "answer": False},
        [
            "All biomass goes through at least some of these steps. Does ethanol take more energy make that produces?\nYes",
            "All biomass goes through at least some of these steps. Does ethanol take more energy make that produces?\nNo",
        ],
        1,
    ),
    "wsc": (
        {"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more skeptical.", "span1_text": "Pete", "span2_text": "He", "label": 1},
        [
            'Mark told Pete many lies about himself, which Pete included in his book. He should have been more skeptical.\nIn the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\nNo',
            'Mark told Pete many lies about himself, which Pete included in his book. He should have been more skeptical.\nIn the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\nYes',
        ],
        1,
    ),
    "wic": (
        {"word": "place", "sentence1": "Do you want to come over to my place later?", "sentence2": "A political system with no place for the less prominent groups.", "label": 0},
        [
            'Does the word "place" have the same meaning in these two sentences? Yes, No?\nDo you want to come over to my place later?\nA political system with no place for the less prominent groups.\nNo',
            'Does the word "place" have the same meaning in these two sentences? Yes, No?\nDo you want to come over to my place later?\nA political system with no place for the less prominent groups.\nYes',
        ],
        0,
    ),
    "multirc": (
        {"paragraph": "Forces can cause a moving object to stop.", "question": "What can stop a moving object?", "answer": "A force", "label": 1},
        [
            'Forces can cause a moving object to stop.\nQuestion: What can stop a moving object?\nI found this answer "A force". Is that correct? Yes or No?\nNo',
            'Forces can cause a moving object to stop.\nQuestion: What can stop a moving object?\nI found this answer "A force". Is that correct? Yes or No?\nYes',
        ],
        1,
    ),
    "copa": (
        {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.", "choice2": "I was standing still.", "question": "cause", "label": 0},
        ["My body cast a shadow over the grass because the sun was rising.", "My body cast a shadow over the grass because I was standing still."],
        0,
    ),
    "record": (
        {
            "passage": "Lakeside FC beat Northport 3-1.\n@highlight\nLakeside FC lift the cup",
            "query": "The final ended in defeat for @placeholder.",
            "entities": ["Lakeside FC", "Northport"],
            "answers": ["Northport"],
        },
        [
            "Lakeside FC beat Northport 3-1.\n- Lakeside FC lift the cup\n- The final ended in defeat for Lakeside FC.",
            "Lakeside FC beat Northport 3-1.\n- Lakeside FC lift the cup\n- The final ended in defeat for Northport.",
        ],
        [1],
    ),
    "squad": (
        {"title": "Super_Bowl_50", "context": "Super Bowl 50 was an American football game.", "question": "What was Super Bowl 50? ", "answers": ["an American football game", "American football game"]},
        ["Title: Super_Bowl_50\nContext: Super Bowl 50 was an American football game.\nQuestion: What was Super Bowl 50?\nAnswer: an American football game\n"],
        None,
    ),
    "drop": (
        {"passage": "The Hawks scored 21 points and the Owls 17.", "question": "How many more points did the Hawks score?", "answers": ["4"]},
        ["Passage: The Hawks scored 21 points and the Owls 17.\nQuestion: How many more points did the Hawks score?\nAnswer: 4\n"],
        None,
    ),
    "gsm8k": (
        {"question": "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?", "answer": "...\n#### 72", "final_answer": "72"},
        ["Question: Natalia sold 48 clips in April and half as many in May. How many clips did she sell?\nAnswer: 72\n"],
        None,
    ),
}
