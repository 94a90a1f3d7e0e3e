#!/usr/bin/env python3
"""Generates the quickstart task: turn a free-text meeting request into one fixed
JSON schema. The base model (SmolLM2-135M-Instruct) answers such requests in prose;
after fine-tuning it should answer with exactly the JSON line.

    python3 data/quickstart/generate.py      # writes train.jsonl and heldout.jsonl here
    python3 data/quickstart/generate.py --extra 800 --extra-seed 1 --out F
        # 800 more requests of the same kind, none of them in train.jsonl or heldout.jsonl:
        # prompts for on-policy preference pairs (data/quickstart/onpolicy_pairs.lua)

Deterministic (fixed seed, no dependencies beyond the standard library). The answer
is compact JSON with keys in a fixed order:
    {"action": "schedule"|"cancel"|"move", "topic": str, "day": weekday,
     "time": "HH:MM", "duration_min": int, "attendees": [names, sorted]}
"""
import argparse
import json
import os
import random

SEED = 20261128
N_TRAIN, N_HELDOUT = 600, 120
HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM = "Extract the meeting request as JSON with keys action, topic, day, time, duration_min, attendees."

NAMES = ["Alice", "Bob", "Carla", "Deepak", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
TOPICS = ["budget review", "sprint planning", "design critique", "hiring sync", "quarterly goals",
          "customer escalation", "release checklist", "onboarding", "security audit",
          "roadmap", "vendor contract", "incident postmortem", "marketing launch", "data migration"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
DURATIONS = [15, 30, 45, 60, 90, 120]

SCHEDULE = ["Can you set up a {d}-minute {topic} with {people} on {day} at {t}?",
            "Please book {people} for the {topic} on {day}, {t}, {d} minutes.",
            "I need a {topic} meeting {day} at {t} with {people}; plan {d} minutes.",
            "Schedule {topic} for {day} {t}. Invite {people}. It should take {d} minutes.",
            "Let's get {people} together on {day} at {t} for {d} min to discuss the {topic}."]
CANCEL = ["Please cancel the {topic} with {people} on {day} at {t} ({d} minutes).",
          "The {d}-minute {topic} on {day} at {t} with {people} is off, cancel it.",
          "Drop the {topic} meeting ({people}, {day} {t}, {d} min)."]
MOVE = ["Move the {topic} with {people} to {day} at {t}, still {d} minutes.",
        "Can we shift the {d}-minute {topic} to {day} {t}? Attendees: {people}.",
        "Reschedule {topic} to {day} at {t} for {people}, {d} minutes long."]


def join(names):
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def clock(rng):
    hour, minute = rng.randint(8, 17), rng.choice([0, 15, 30, 45])
    spoken = f"{hour}:{minute:02d}" if rng.random() < 0.5 else (
        f"{(hour - 1) % 12 + 1}:{minute:02d} {'am' if hour < 12 else 'pm'}")
    return f"{hour:02d}:{minute:02d}", spoken


def example(rng):
    action = rng.choices(["schedule", "cancel", "move"], weights=[3, 1, 1])[0]
    people = rng.sample(NAMES, rng.randint(1, 3))
    topic, day, d = rng.choice(TOPICS), rng.choice(DAYS), rng.choice(DURATIONS)
    t24, spoken = clock(rng)
    pattern = rng.choice({"schedule": SCHEDULE, "cancel": CANCEL, "move": MOVE}[action])
    request = pattern.format(d=d, topic=topic, people=join(people), day=day, t=spoken)
    answer = json.dumps({"action": action, "topic": topic, "day": day, "time": t24,
                         "duration_min": d, "attendees": sorted(people)}, separators=(", ", ": "))
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": request},
                         {"role": "assistant", "content": answer}]}


def distinct(rng, n, seen):
    """n examples whose requests are not in seen (which grows with them)."""
    rows = []
    while len(rows) < n:
        ex = example(rng)
        key = ex["messages"][1]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    return rows


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for ex in rows:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", type=int, default=0, help="write this many new requests instead")
    ap.add_argument("--extra-seed", type=int, default=1)
    ap.add_argument("--out", default="", help="where --extra writes")
    args = ap.parse_args()
    seen = set()
    rows = distinct(random.Random(SEED), N_TRAIN + N_HELDOUT, seen)  # held-out never in training
    if args.extra > 0:
        if not args.out:
            ap.error("--extra needs --out")
        write(args.out, distinct(random.Random(SEED + 1000 * args.extra_seed), args.extra, seen))
        print(f"wrote {args.extra} new requests to {args.out}")
        return
    write(os.path.join(HERE, "train.jsonl"), rows[:N_TRAIN])
    write(os.path.join(HERE, "heldout.jsonl"), rows[N_TRAIN:])
    print(f"wrote {N_TRAIN} training and {N_HELDOUT} held-out examples to {HERE}")


if __name__ == "__main__":
    main()
