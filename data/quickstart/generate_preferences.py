#!/usr/bin/env python3
"""Generates preference pairs for the quickstart task (recipes/quickstart_dpo.lua): the
same meeting requests as generate.py, each with the correct JSON answer (chosen) and a
wrong one (rejected) that holds one of the mistakes a small fine-tuned model still makes.

    python3 data/quickstart/generate_preferences.py   # writes prefs_train.jsonl, prefs_heldout.jsonl

Deterministic (its own fixed seed, the standard library only). Each line is

    {"prompt": [system, user], "chosen": "<answer>", "rejected": "<answer with a mistake>"}

with the chosen answer exactly as generate.py writes it. The mistakes, drawn by weight:
    order      attendees in the order the request names them, not sorted       25
    clock      a 12-hour time: "5:00 pm", "05:00" for 17:00, "8:15 am"          25
    action     a wrong action word: another action, or book/reschedule/delete   20
    missing    a field left out: duration_min, attendees or topic               15
    value      a wrong duration (hours, or another option) or a wrong day      15
"order" applies only where the request names two or more attendees out of sorted
order (about a third of requests); elsewhere another kind is drawn by the same weights.
The script prints the counts (order 42, clock 168, action 111, missing 97, value 82). No request occurs in heldout.jsonl (the
SFT held-out set of the accuracy check), and the held-out pairs share no request with
the training pairs.
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate  # noqa: E402  (the vocabulary, patterns and answer format of the task)

SEED = 20261204
N_TRAIN, N_HELDOUT = 400, 100
KINDS = [("order", 25), ("clock", 25), ("action", 20), ("missing", 15), ("value", 15)]
SYNONYMS = {"schedule": ["book", "create", "add"], "cancel": ["delete", "remove"],
            "move": ["reschedule", "shift"]}


def dumps(obj):
    return json.dumps(obj, separators=(", ", ": "))


def parse_request(rng):
    """A request and its answer as generate.py makes them, plus the names in request order."""
    ex = generate.example(rng)
    request = ex["messages"][1]["content"]
    answer = json.loads(ex["messages"][2]["content"])
    spoken = sorted(answer["attendees"], key=request.index)
    return ex, request, answer, spoken


def twelve_hour(t24, rng):
    hour, minute = int(t24[:2]), t24[3:]
    h12 = (hour - 1) % 12 + 1
    suffix = "am" if hour < 12 else "pm"
    forms = [f"{h12}:{minute} {suffix}", f"{h12}:{minute}"]
    if hour > 12:
        forms.append(f"{h12:02d}:{minute}")
    return rng.choice([f for f in forms if f != t24])


def mistake(kind, answer, spoken, rng):
    """The answer with one mistake of `kind`, or None when the kind does not apply."""
    wrong = dict(answer)
    if kind == "order":
        if spoken == answer["attendees"]:
            return None
        wrong["attendees"] = spoken
    elif kind == "clock":
        wrong["time"] = twelve_hour(answer["time"], rng)
    elif kind == "action":
        others = [a for a in ("schedule", "cancel", "move") if a != answer["action"]]
        wrong["action"] = rng.choice(others + SYNONYMS[answer["action"]])
    elif kind == "missing":
        del wrong[rng.choice(["duration_min", "attendees", "topic"])]
    elif kind == "value":
        if rng.random() < 0.5:
            d = answer["duration_min"]
            options = [x for x in generate.DURATIONS if x != d] + ([d // 60] if d % 60 == 0 else [])
            wrong["duration_min"] = rng.choice(options)
        else:
            wrong["day"] = rng.choice([x for x in generate.DAYS if x != answer["day"]])
    return dumps(wrong)


def main():
    rng = random.Random(SEED)
    with open(os.path.join(HERE, "heldout.jsonl"), encoding="utf-8") as f:
        sft_heldout = {json.loads(line)["messages"][1]["content"] for line in f if line.strip()}
    seen, rows, avoided = set(), [], 0
    counts = {k: 0 for k, _ in KINDS}
    while len(rows) < N_TRAIN + N_HELDOUT:
        ex, request, answer, spoken = parse_request(rng)
        if request in seen or request in sft_heldout:
            avoided += 1
            continue
        seen.add(request)
        kinds = [k for k, _ in KINDS]
        kind = rng.choices(kinds, weights=[w for _, w in KINDS])[0]
        rejected = mistake(kind, answer, spoken, rng)
        if rejected is None:  # order does not apply to this request: another kind
            rest = [(k, w) for k, w in KINDS if k != "order"]
            kind = rng.choices([k for k, _ in rest], weights=[w for _, w in rest])[0]
            rejected = mistake(kind, answer, spoken, rng)
        chosen = ex["messages"][2]["content"]
        assert rejected != chosen
        counts[kind] += 1
        rows.append({"prompt": ex["messages"][:2], "chosen": chosen, "rejected": rejected})
    for name, part in (("prefs_train.jsonl", rows[:N_TRAIN]), ("prefs_heldout.jsonl", rows[N_TRAIN:])):
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {N_TRAIN} training and {N_HELDOUT} held-out pairs to {HERE}; mistakes: " +
          ", ".join(f"{k} {v}" for k, v in counts.items()) +
          f"; {avoided} repeated or SFT held-out requests skipped")


if __name__ == "__main__":
    main()
