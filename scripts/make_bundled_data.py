"""Generate the bundled demo and test data under hp_deepspeed/bundled/data/ (deterministic).

    python scripts/make_bundled_data.py [--out hp_deepspeed/bundled/data] [--seed 0]

Two kinds of data, both invented by this script (no download, no licensed text):

* ``synthetic/{copy,reverse,sort,first,last}``: the *same* sequences of 3-6 words in every
  task, with no task text in the input; the target is the sequence copied, reversed, sorted,
  or its first or last word. A model that is not told the task cannot do better than guess
  which operation is wanted, a task-conditioned one can learn all five. Each position draws
  its word from its own 6 words (``SYNTHETIC_SLOTS``), so which input word goes where in the
  output is readable from the words themselves: T5's cross-attention has no position, and
  with one shared vocabulary a small model spends its whole budget learning to count
  positions (first/last stayed near 30% after 300 demo steps) before the task can matter.
  1000 training and 100 validation sequences (disjoint), in ``inputs`` / ``targets`` fields.
* ``fidelity/*``: the suite of ``python -m bench.fidelity``, seven tasks in two input families,
  with a ``validation`` split (100 rows, where the study picks its learning rate) and a
  ``test`` split (200 rows, the one it reports), all three splits disjoint. Word sequences as
  above, the same in five tasks: ``copy``, ``first``, ``last``, ``count`` (the number of words,
  as a word: an output unrelated to the others) and ``reverse``, which shares its structure
  with ``copy`` and is low-resource (100 training rows). Template sentences ("Alice painted
  the old violin in Oslo.") in two tasks: ``object`` (the noun) and ``place``, which shares
  its structure with ``object`` and is low-resource (100 training rows). No task text in the
  inputs: the conditioning (or the multi-task baseline's task prefix) names the task.
* ``glue/*`` and ``superglue/*``: a dozen rows per split in the schema of the hub datasets
  ``nyu-mll/glue`` and ``aps/super_glue`` (integer labels in the hub's order, ``idx`` fields,
  ReCoRD's ``@highlight`` passages and entity lists, MultiRC's HTML markup, WSC's word
  indices, AX-g's gender pairs), with every label present, so each preprocessor and metric
  runs end to end. The text is template-made and meaningless as a benchmark.

Running it twice gives byte-identical files; the committed files are its output.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROWS = 12
# Position i of a sequence draws from SYNTHETIC_SLOTS[i] (single pieces of the bundled
# tokenizer; mixed so that alphabetical order is not position order, which keeps sort a task).
SYNTHETIC_SLOTS = (
    ("gnu", "ant", "river", "wooden", "pilot", "harbor"),
    ("elk", "tower", "ladder", "curious", "lantern", "meadow"),
    ("hen", "castle", "fox", "violin", "dark", "orchard"),
    ("dog", "window", "ancient", "temple", "cat", "mirror"),
    ("baker", "golden", "forest", "umbrella", "island", "kitchen"),
    ("silver", "engine", "basket", "noisy", "journal", "valley"),
)
SYNTHETIC_OPS = {
    "copy": lambda w: " ".join(w),
    "reverse": lambda w: " ".join(reversed(w)),
    "sort": lambda w: " ".join(sorted(w)),
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
}

NAMES = "Alice Bruno Chen Dana Emil Farah Greta Hugo Ines Jonas Kira Liam Maya Nora Omar Priya Quinn Rosa Sami Tara".split()
FEMALE = {"Alice", "Dana", "Farah", "Greta", "Ines", "Kira", "Maya", "Nora", "Priya", "Rosa", "Tara"}
NOUNS = (
    "teacher doctor farmer painter sailor baker pilot singer writer lawyer garden river bridge window "
    "village market castle forest island harbor library museum kitchen station mountain valley engine "
    "letter bicycle lantern blanket violin compass ladder basket hammer mirror pencil ticket wallet "
    "umbrella candle carpet pocket bottle feather journal meadow orchard tunnel tower temple palace "
    "factory theater stadium airport hospital school office cabin cottage"
).split()
ADJECTIVES = (
    "old young quiet noisy bright dark heavy light warm cold tiny huge narrow wide gentle rough "
    "careful careless famous humble ancient modern empty crowded golden silver wooden broken clever "
    "patient curious nervous"
).split()
VERBS = (
    "found painted repaired visited cleaned borrowed carried opened closed watched measured sold "
    "bought built described ignored praised followed noticed moved lifted dropped hid shared "
    "protected studied"
).split()
PLACES = "Lisbon Oslo Cairo Lima Quebec Kyoto Dakar Perth Tallinn Hanoi Bergen Porto".split()
# Invented town names widen the vocabulary the bundled tokenizer is trained on (to ~1000 pieces).
_SYLLABLES = "ka lo mi ren dor vi sa tel an bru ge ho ish ju quo fe nak pri sul wen zo thy".split()
PLACES += sorted({"".join(random.Random(f"town{i}").sample(_SYLLABLES, 3)).capitalize() for i in range(1200)})
TIMES = ["yesterday", "today", "last week", "on Monday", "in spring", "at dawn", "after lunch", "before winter"]


class Text:
    """Deterministic template sentences over the word lists above."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, words):
        return self.rng.choice(words)

    def sentence(self, name: str | None = None, noun: str | None = None) -> str:
        name = name or self.pick(NAMES)
        noun = noun or self.pick(NOUNS)
        return f"{name} {self.pick(VERBS)} the {self.pick(ADJECTIVES)} {noun} in {self.pick(PLACES)}."

    def question(self) -> str:
        return f"did {self.pick(NAMES)} see the {self.pick(ADJECTIVES)} {self.pick(NOUNS)} near the {self.pick(NOUNS)}?"

    def paraphrase(self, sentence: str) -> str:
        return sentence.replace(" the ", " that ").rstrip(".") + " there."


def labels(rng: random.Random, n: int, classes: int) -> list[int]:
    """``n`` labels covering every class, in a seeded order."""
    out = [i % classes for i in range(n)]
    rng.shuffle(out)
    return out


def glue_rows(task: str, split: str, rng: random.Random) -> list[dict]:
    t = Text(rng)
    rows = []
    if task == "stsb":
        for i in range(ROWS):
            a = t.sentence()
            rows.append({"sentence1": a, "sentence2": t.paraphrase(a) if i % 2 else t.sentence(),
                         "label": round(rng.uniform(0, 5), 3), "idx": i})
        return rows
    classes = {"cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2}[task]
    for i, label in enumerate(labels(rng, ROWS, classes)):
        a = t.sentence()
        if task == "cola":
            row = {"sentence": a if label else " ".join(reversed(a.rstrip(".").split())) + "."}
        elif task == "sst2":
            mood = "wonderful and moving" if label else "dull and tiresome"
            row = {"sentence": f"the {t.pick(ADJECTIVES)} story about the {t.pick(NOUNS)} was {mood}"}
        elif task == "mrpc":
            row = {"sentence1": a, "sentence2": t.paraphrase(a) if label else t.sentence()}
        elif task == "qqp":
            q = t.question()
            row = {"question1": q, "question2": q.replace("see", "notice") if label else t.question()}
        elif task == "mnli":
            genre = "fiction" if split == "validation_mismatched" else "travel"
            hyp = [a.replace(" in ", " somewhere near "), t.sentence(), a.replace(" the ", " no ", 1)][label]
            row = {"premise": f"In this {genre} story, {a}", "hypothesis": hyp}
        elif task == "qnli":
            q = t.question()
            row = {"question": q, "sentence": a if label else f"The answer is that {a.lower()}"}
        else:  # rte, wnli
            entailed = label == 0 if task == "rte" else label == 1
            row = {"sentence1": f"{a} Then it rained {t.pick(TIMES)}.",
                   "sentence2": a if entailed else t.sentence()}
        rows.append({**row, "label": label, "idx": i})
    return rows


def record_rows(split: str, rng: random.Random) -> list[dict]:
    t = Text(rng)
    rows = []
    for i in range(ROWS):
        people = rng.sample(NAMES, 3)
        place = t.pick(PLACES)
        passage = (
            f"{people[0]} met {people[1]} in {place} {t.pick(TIMES)}. {t.sentence(people[2])} "
            f"\"It was {t.pick(ADJECTIVES)}\", said {people[0]}.\n@highlight\n{people[1]} travelled to {place}"
            f"\n@highlight\n{people[2]} {t.pick(VERBS)} a {t.pick(NOUNS)}"
        )
        entities = sorted(set(people + [place]))
        answer = people[1]
        query = f"Later @placeholder told the {t.pick(NOUNS)} about {place}."
        rows.append({"passage": passage, "query": query, "entities": entities,
                     "answers": [answer], "idx": {"passage": i, "query": i}})
    return rows


def multirc_rows(split: str, rng: random.Random) -> list[dict]:
    t = Text(rng)
    rows = []
    for p in range(2):
        sents = [t.sentence() for _ in range(3)]
        paragraph = "".join(f"<b>Sent {j + 1}: </b>{s}<br>" for j, s in enumerate(sents))
        for q in range(2):
            question = f"What did {sents[q].split()[0]} do?"
            for a, label in enumerate(labels(rng, 3, 2)):
                answer = " ".join(sents[q].split()[1:5]) if label else t.sentence().lower()
                rows.append({"paragraph": paragraph, "question": question, "answer": answer,
                             "idx": {"paragraph": p, "question": 2 * p + q, "answer": 3 * (2 * p + q) + a},
                             "label": label})
    return rows


def wsc_rows(split: str, rng: random.Random) -> list[dict]:
    rows = []
    for i, label in enumerate(labels(rng, ROWS, 2)):
        a, b = rng.sample(sorted(FEMALE), 2)
        noun = rng.choice(NOUNS)
        words = f"{a} gave the {noun} to {b} because she was {rng.choice(ADJECTIVES)} .".split()
        pronoun_index = words.index("she")
        span1 = a if label else b
        rows.append({"text": " ".join(words), "span1_index": words.index(span1), "span2_index": pronoun_index,
                     "span1_text": span1, "span2_text": "she", "label": label, "idx": i})
    return rows


def wic_rows(split: str, rng: random.Random) -> list[dict]:
    t = Text(rng)
    rows = []
    for i, label in enumerate(labels(rng, ROWS, 2)):
        word = t.pick(NOUNS)
        s1 = f"The {word} in {t.pick(PLACES)} was {t.pick(ADJECTIVES)}."
        s2 = f"She kept the {word} {t.pick(TIMES)}." if label else f"They call him the {word} of {t.pick(PLACES)}."
        rows.append({"word": word, "sentence1": s1, "sentence2": s2, "start1": s1.index(word),
                     "end1": s1.index(word) + len(word), "start2": s2.index(word),
                     "end2": s2.index(word) + len(word), "label": label, "idx": i})
    return rows


def superglue_rows(task: str, split: str, rng: random.Random) -> list[dict]:
    special = {"record": record_rows, "multirc": multirc_rows, "wsc": wsc_rows, "wic": wic_rows}
    if task in special:
        return special[task](split, rng)
    t = Text(rng)
    rows = []
    classes = {"boolq": 2, "cb": 3, "copa": 2, "rte": 2, "axb": 2, "axg": 2}[task]
    for i, label in enumerate(labels(rng, ROWS, classes)):
        a = t.sentence()
        if task == "boolq":
            row = {"question": f"is the {t.pick(NOUNS)} {t.pick(ADJECTIVES)}", "passage": f"{a} {t.sentence()}"}
        elif task == "cb":
            hyp = [a, a.replace(" the ", " no ", 1), f"maybe {a.lower()}"][label]
            row = {"premise": f"{t.pick(NAMES)} said that {a.lower()}", "hypothesis": hyp}
        elif task == "copa":
            right, wrong = f"the {t.pick(NOUNS)} was {t.pick(ADJECTIVES)}.", t.sentence()
            row = {"premise": a, "choice1": wrong if label else right, "choice2": right if label else wrong,
                   "question": "cause" if i % 2 else "effect"}
        elif task in ("rte", "axb"):
            row = {"sentence1": f"{a} It happened {t.pick(TIMES)}.", "sentence2": t.sentence() if label else a}
        else:  # axg: rows 2k and 2k+1 differ only in the pronoun, and share the label
            label = labels(random.Random(i // 2), 2, 2)[0]
            pronoun = "he" if i % 2 == 0 else "she"
            job = NOUNS[(i // 2) % 10]
            premise = f"The {job} told the client that {pronoun} would finish the {NOUNS[20 + i // 2]} {TIMES[i // 2 % 8]}."
            hyp = f"The {job} would finish the {NOUNS[20 + i // 2]}." if label == 0 else f"The client would finish the {NOUNS[20 + i // 2]}."
            row = {"premise": premise, "hypothesis": hyp}
        rows.append({**row, "label": label, "idx": i})
    return rows


GLUE_SPLITS = {task: ["train", "validation"] for task in ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "wnli")}
GLUE_SPLITS["mnli"] = ["train", "validation_matched", "validation_mismatched"]
SUPERGLUE_SPLITS = {task: ["train", "validation"] for task in ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")}
SUPERGLUE_SPLITS.update(axb=["test"], axg=["test"])


def synthetic_sequences(rng: random.Random, count: int, exclude: set) -> list[tuple[str, ...]]:
    seen, out = set(exclude), []
    while len(out) < count:
        seq = tuple(rng.choice(SYNTHETIC_SLOTS[i]) for i in range(rng.randint(3, 6)))
        if seq not in seen:
            seen.add(seq)
            out.append(seq)
    return out


FIDELITY_TRAIN, FIDELITY_LOW_RESOURCE, FIDELITY_VALIDATION, FIDELITY_TEST = 1000, 100, 100, 200
COUNT_WORDS = {3: "three", 4: "four", 5: "five", 6: "six"}
FIDELITY_SEQUENCE_OPS = {
    "copy": SYNTHETIC_OPS["copy"],
    "first": SYNTHETIC_OPS["first"],
    "last": SYNTHETIC_OPS["last"],
    "count": lambda w: COUNT_WORDS[len(w)],
    "reverse": SYNTHETIC_OPS["reverse"],
}
FIDELITY_SENTENCE_OPS = {"object": lambda s: s["noun"], "place": lambda s: s["place"]}
FIDELITY_LOW_RESOURCE_TASKS = ("reverse", "place")


def fidelity_sentences(rng: random.Random, count: int, exclude: set) -> list[dict]:
    """Distinct template sentences with their noun and (real, short) place."""
    seen, out = set(exclude), []
    while len(out) < count:
        s = {"name": rng.choice(NAMES), "verb": rng.choice(VERBS), "adj": rng.choice(ADJECTIVES),
             "noun": rng.choice(NOUNS), "place": rng.choice(PLACES[:12])}
        text = f"{s['name']} {s['verb']} the {s['adj']} {s['noun']} in {s['place']}."
        if text not in seen:
            seen.add(text)
            out.append({**s, "text": text})
    return out


def fidelity_rows(seed: int) -> dict[str, dict[str, list[dict]]]:
    """task -> split -> rows of the fidelity suite."""
    sizes = {"validation": FIDELITY_VALIDATION, "test": FIDELITY_TEST}
    rng = random.Random(f"{seed}/fidelity")
    out: dict[str, dict[str, list[dict]]] = {}
    for family, ops, draw, text in (
        ("sequences", FIDELITY_SEQUENCE_OPS, synthetic_sequences, lambda x: " ".join(x)),
        ("sentences", FIDELITY_SENTENCE_OPS, fidelity_sentences, lambda x: x["text"]),
    ):
        splits, used = {}, set()
        for split, n in (("train", FIDELITY_TRAIN), *sizes.items()):
            splits[split] = draw(rng, n, used)
            used |= {x if isinstance(x, tuple) else x["text"] for x in splits[split]}
        for op, fn in ops.items():
            n_train = FIDELITY_LOW_RESOURCE if op in FIDELITY_LOW_RESOURCE_TASKS else FIDELITY_TRAIN
            out[op] = {split: [{"inputs": text(x), "targets": fn(x)} for x in xs[: n_train if split == "train" else None]]
                       for split, xs in splits.items()}
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "hp_deepspeed/bundled/data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-train", type=int, default=1000)
    parser.add_argument("--synthetic-validation", type=int, default=100)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    train = synthetic_sequences(rng, args.synthetic_train, set())
    validation = synthetic_sequences(rng, args.synthetic_validation, set(train))
    for op, fn in SYNTHETIC_OPS.items():
        for split, seqs in (("train", train), ("validation", validation)):
            write_jsonl(args.out / "synthetic" / op / f"{split}.jsonl",
                        [{"inputs": " ".join(s), "targets": fn(s)} for s in seqs])

    for task, splits in fidelity_rows(args.seed).items():
        for split, rows in splits.items():
            write_jsonl(args.out / "fidelity" / task / f"{split}.jsonl", rows)

    for benchmark, table, make in (("glue", GLUE_SPLITS, glue_rows), ("superglue", SUPERGLUE_SPLITS, superglue_rows)):
        for task, splits in table.items():
            for split in splits:
                rows = make(task, split, random.Random(f"{args.seed}/{benchmark}/{task}/{split}"))
                write_jsonl(args.out / benchmark / task / f"{split}.jsonl", rows)
    print(f"wrote bundled data under {args.out}")


if __name__ == "__main__":
    main()
