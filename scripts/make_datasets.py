"""Generate the bundled datasets in data/ (deterministic by seed; rerun to reproduce byte for byte).

  data/arith/{train,test}.jsonl     SFT, `messages`: short arithmetic word problems; the answer shows the
                                    sum and ends with "The answer is N." (exact match on held-out rows)
  data/tips/{train,test}.jsonl      preference, `prompt`/`chosen`/`rejected` message lists: advice
                                    questions; chosen = bullet list + "Hope this helps!", rejected = the
                                    same advice as one paragraph without the sign-off
  data/general/test.jsonl           `text`: plain English sentences for a perplexity probe

The two skills differ in kind (numbers vs advice), so the alignment-tax experiment can tell what each
branch keeps.  Held-out advice rows use topics never seen in training.

    python scripts/make_datasets.py [--seed 0] [--out data]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yara", "Zoe"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "shells", "cards", "stamps", "buttons",
          "cookies", "flowers", "rocks", "toy cars", "balloons", "candles"]


def arith_row(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    op = rng.choice(["add", "add", "sub", "mul"])
    if op == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = rng.choice([f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
                        f"{name} had {a} {thing}. A friend gave {name} {b} more. How many {thing} does {name} have?",
                        f"There are {a} {thing} in a box and {b} {thing} on the table. How many {thing} are there "
                        f"in total?"])
        work, c = f"{a} + {b} = {a + b}.", a + b
    elif op == "sub":
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        q = rng.choice([f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?",
                        f"{name} had {a} {thing} but lost {b} of them. How many {thing} does {name} have now?"])
        work, c = f"{a} - {b} = {a - b}.", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = rng.choice([f"{name} fills {a} bags with {b} {thing} each. How many {thing} is that?",
                        f"There are {a} boxes with {b} {thing} in each box. How many {thing} are there?"])
        work, c = f"{a} x {b} = {a * b}.", a * b
    return {"messages": [{"role": "user", "content": q},
                         {"role": "assistant", "content": f"{work} The answer is {c}."}], "answer": c}


# (goal as a verb phrase, the activity as a noun phrase)
GOALS = [
    ("learn to play the guitar", "guitar practice"), ("keep my houseplants alive", "plant care"),
    ("sleep better at night", "your evening routine"), ("save more money each month", "your budget"),
    ("get better at public speaking", "speaking practice"), ("learn a new language", "language study"),
    ("start running regularly", "your runs"), ("keep my kitchen tidy", "kitchen cleaning"),
    ("read more books", "your reading"), ("cook healthier meals", "meal planning"),
    ("stay focused while studying", "study sessions"), ("improve my handwriting", "handwriting practice"),
    ("learn to draw", "drawing practice"), ("get fit at home", "home workouts"),
    ("write a short story", "your writing"), ("grow vegetables on a balcony", "balcony gardening"),
    ("keep in touch with old friends", "staying in touch"), ("organize my closet", "closet sorting"),
    ("learn to swim", "swimming lessons"), ("take better photos", "photo practice"),
    ("drink more water", "your water habit"), ("wake up earlier", "your morning routine"),
    ("practice meditation", "meditation"), ("learn to code", "coding practice"),
    ("bake my own bread", "bread baking"), ("prepare for a job interview", "interview preparation"),
    ("train my puppy", "puppy training"), ("reduce screen time", "screen habits"),
    ("plan a weekend trip", "trip planning"), ("learn to knit", "knitting"),
    ("keep a journal", "journaling"), ("improve my chess", "chess study"),
    ("learn to juggle", "juggling practice"), ("paint with watercolors", "watercolor practice"),
    ("ride a bike in the city", "city cycling"), ("memorize a speech", "speech practice"),
    ("start a small herb garden", "the herb garden"), ("spend less on groceries", "grocery shopping"),
    ("make my desk more comfortable", "your desk setup"), ("learn basic first aid", "first aid training"),
    ("keep my car clean", "car cleaning"), ("get better at math", "math practice"),
    ("learn to sing", "singing practice"), ("declutter my room", "decluttering"),
    ("stop procrastinating", "your task list"), ("build a reading habit for my kids", "family reading time"),
    ("learn to type faster", "typing practice"), ("care for a new cat", "cat care"),
]
HELD_OUT_GOALS = 8  # the last goals appear only in the test split
TIPS = [
    "Set a small, fixed time each day for {t}.",
    "Start with the basics of {t} before anything advanced.",
    "Track your progress with {t} in a short notebook.",
    "Ask someone experienced with {t} for feedback.",
    "Take short breaks so {t} stays enjoyable.",
    "Pick one clear goal for {t} this week.",
    "Remove distractions while you work on {t}.",
    "Review what worked in {t} at the end of each week.",
]
ASKS = ["How can I {g}?", "Any tips to {g}?", "What is a good way to {g}?", "I want to {g}. Where do I start?",
        "Could you give me advice on how to {g}?"]
SIGN_OFF = "Hope this helps!"


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:]


def tips_row(rng: random.Random, goal: tuple[str, str]) -> dict:
    g, t = goal
    tips = [x.format(t=t) for x in rng.sample(TIPS, 3)]
    chosen = "Here are a few tips:\n" + "\n".join(f"- {x}" for x in tips) + f"\n{SIGN_OFF}"
    body = [_lower_first(x).rstrip(".") for x in tips]
    rejected = (f"Well, there are a lot of things you could do. You should {body[0]}, and you might also "
                f"{body[1]}. Another idea is to {body[2]}.")
    return {"prompt": [{"role": "user", "content": rng.choice(ASKS).format(g=g)}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


SUBJECTS = ["The old fisherman", "A young teacher", "The small dog", "My neighbor", "The baker", "A tired student",
            "The bus driver", "Her grandmother", "The quiet librarian", "A group of children", "The farmer",
            "His brother", "The painter", "An old sailor", "The new doctor", "Our cat"]
PREDICATES = ["walked slowly along the harbor", "opened the shop before sunrise", "waited patiently by the door",
              "sang a song about the sea", "read the letter twice", "carried bread to the market",
              "stopped at every corner", "planted tomatoes in the garden", "laughed at the silly joke",
              "crossed the bridge in the rain", "painted the fence green", "found a coin under the bench",
              "fell asleep on the sofa", "watched the stars for an hour", "fixed the broken chair",
              "climbed the hill to see the town"]
TIMES = ["this morning", "last night", "on Sunday", "after lunch", "in the spring", "every evening",
         "before the storm", "during the holidays", "at noon", "yesterday"]


def general_rows(rng: random.Random, n: int) -> list[dict]:
    combos = [(s, p, t) for s in SUBJECTS for p in PREDICATES for t in TIMES]
    return [{"text": f"{s} {p} {t}."} for s, p, t in rng.sample(combos, n)]


def _unique(gen, n: int, seen: set, key) -> list[dict]:
    out = []
    while len(out) < n:
        r = gen()
        k = key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def make(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set = set()
    akey = lambda r: r["messages"][0]["content"]  # noqa: E731
    arith_test = _unique(lambda: arith_row(rng), 100, seen, akey)
    arith_train = _unique(lambda: arith_row(rng), 500, seen, akey)
    train_goals, test_goals = GOALS[:-HELD_OUT_GOALS], GOALS[-HELD_OUT_GOALS:]
    seen = set()
    tkey = lambda r: (r["prompt"][0]["content"], r["chosen"][0]["content"])  # noqa: E731
    tips_train = _unique(lambda: tips_row(rng, rng.choice(train_goals)), 300, seen, tkey)
    tips_test = _unique(lambda: tips_row(rng, rng.choice(test_goals)), 100, seen, tkey)
    for r in arith_train + arith_test:
        del r["answer"]  # derivable from the text; keep rows in the plain TRL `messages` format
    return {"arith/train": arith_train, "arith/test": arith_test, "tips/train": tips_train,
            "tips/test": tips_test, "general/test": general_rows(rng, 300)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data"))
    args = ap.parse_args(argv)
    for name, rows in make(args.seed).items():
        path = Path(args.out) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
