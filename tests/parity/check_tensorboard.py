#!/usr/bin/env python3
"""check_tensorboard.py — moontune's TensorBoard event files, read by the reference reader.
Run by hand (not part of ctest):

    pip install tensorboard            # tbparse too, optionally (it is checked when present)
    python3 tests/parity/check_tensorboard.py [--moontune build/moontune] [--run RUN_DIR ...]

With --run it checks those run directories. Without, it trains in a temporary
directory with the tiny test models (tests/fixtures):
  (a) tests/run/tiny_lora.lua (LoRA, held-out evaluations, checkpoints every 4 steps),
      stopped after step 6; the step-6 checkpoint is then removed, so that the resumed
      run goes on from step 4 and repeats steps 5 and 6 with the first file still holding
      them: the reference reader must show each step once, with the resumed run's values;
  (b) recipes/dpo.lua on tests/fixtures/tiny_chat (the loss's own metrics:
      rewards/accuracies, rewards/margins, logps/chosen, ...).
For each run directory, tensorboard's EventAccumulator (as TensorBoard itself loads a
run) must hold, for every tag, exactly the steps and values of metrics.jsonl: every
number of every record but its step, tag = the record's key, in the order written,
values rounded to float32. Every record of every events file passes tensorboard's own
record reader with its CRC checks, and each file starts with file_version brain.Event:2.
With tbparse installed, its SummaryReader must find the same scalars. Prints what it
checked; exits 1 on a failure.
"""
import argparse
import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def expected_scalars(run):
    """tag -> [(step, float32 value)] from metrics.jsonl, in file order."""
    out = defaultdict(list)
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for k in sorted(rec):
                v = rec[k]
                if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                out[k].append((rec["step"], f32(v)))
    return out


def check_records(path):
    """Every record through tensorboard's record reader (CRCs checked); the events."""
    reader = PyRecordReader_New(path)
    events = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        events.append(event_pb2.Event.FromString(reader.record()))
    if not events or events[0].file_version != "brain.Event:2":
        raise AssertionError(f"{path}: the first event is not file_version brain.Event:2")
    return events


def check_run(run):
    failed = []
    files = sorted(glob.glob(os.path.join(run, "*tfevents*")))
    if not files:
        return [f"{run}: no events file"]
    n_events, restarts, file_restarts = 0, [], {}
    for i, path in enumerate(files):
        events = check_records(path)
        n_events += len(events)
        starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
        restarts += starts
        if starts:
            file_restarts[i] = min(starts)
    acc = EventAccumulator(run, size_guidance={SCALARS: 0})  # 0: keep every scalar
    acc.Reload()
    got = {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    want = expected_scalars(run)
    n = sum(len(v) for v in want.values())
    if set(got) != set(want):
        failed.append(f"{run}: tags differ: only in events {sorted(set(got) - set(want))}, "
                      f"only in metrics.jsonl {sorted(set(want) - set(got))}")
    for tag in sorted(set(got) & set(want)):
        if got[tag] != want[tag]:
            diff = next(((i, a, b) for i, (a, b) in enumerate(zip(got[tag], want[tag])) if a != b),
                        (min(len(got[tag]), len(want[tag])), None, None))
            failed.append(f"{run}: tag {tag}: {len(got[tag])} scalars in the events, {len(want[tag])} in "
                          f"metrics.jsonl; first difference at #{diff[0]}: events {diff[1]}, metrics.jsonl {diff[2]}")
    print(f"{run}: {len(files)} events file(s), {n_events} events"
          f"{f', SessionLog START at step(s) {restarts}' if restarts else ''}; EventAccumulator: "
          f"{len(got)} tags, {sum(len(v) for v in got.values())} scalars; metrics.jsonl: {len(want)} tags, {n} scalars"
          f" -> {'equal' if not failed else 'DIFFERENT'}")
    print(f"    tags: {', '.join(sorted(got))}")
    try:
        from tbparse import SummaryReader
    except ImportError:
        print("    tbparse: not installed, skipped")
        return failed
    df = SummaryReader(run, pivot=False, extra_columns={"file_name"}).scalars
    # tbparse reads every file as it is, without TensorBoard's purge: apply the
    # SessionLog START of each file to the files before it, then compare as multisets
    order = {os.path.basename(p): i for i, p in enumerate(files)}
    kept = Counter()
    for row in df.itertuples():
        i = order[row.file_name]
        if any(j > i and row.step >= restart for j, restart in file_restarts.items()):
            continue
        kept[(row.tag, int(row.step), f32(float(row.value)))] += 1
    want_all = Counter((t, s, v) for t, vals in want.items() for s, v in vals)
    same = kept == want_all
    print(f"    tbparse: {df['tag'].nunique()} tags, {len(df)} scalars read, {sum(kept.values())} after the "
          f"files' SessionLog START; {'equal to' if same else 'DIFFERENT from'} metrics.jsonl")
    if not same:
        failed.append(f"{run}: tbparse's scalars differ from metrics.jsonl")
    return failed


def run_cmd(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def train(moontune, work):
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    recipe = os.path.join(ROOT, "tests", "run", "tiny_lora.lua")
    sets = ["--set", f"fixtures={fixtures}", "--set", "steps=12", "--set", "save_every=4", "--set", "out_dir=lora"]
    run_cmd([moontune, "run", recipe, *sets, "--set", "stop_at=6"], work)
    shutil.rmtree(os.path.join(work, "lora", "checkpoints", "step-00000006"))
    out = run_cmd([moontune, "run", recipe, *sets, "--set", "resume=true", "--allow-changes"], work)
    line = next((l for l in out.splitlines() if l.startswith("resumed from")), "")
    print(f"(a) tiny_lora.lua stopped at step 6, its step-6 checkpoint removed; {line}")
    run_cmd([moontune, "run", os.path.join(ROOT, "recipes", "dpo.lua"),
             "--set", f"model={fixtures}/tiny_chat", "--set", f"data={fixtures}/data/tiny_prefs.jsonl",
             "--set", f"heldout={fixtures}/data/tiny_prefs.jsonl", "--set", f"general={fixtures}/data/text.jsonl",
             "--set", "seq_len=128", "--set", "batch=2", "--set", "max_steps=4", "--set", "export=",
             "--set", "out_dir=dpo"], work)
    print("(b) recipes/dpo.lua on tiny_chat, 4 steps")
    return [os.path.join(work, "lora"), os.path.join(work, "dpo")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moontune", default=os.path.join(ROOT, "build", "moontune"), help="the moontune binary")
    ap.add_argument("--run", action="append", help="a run directory to check (repeatable)")
    args = ap.parse_args()
    work = None
    runs = args.run
    if not runs:
        work = tempfile.mkdtemp(prefix="moontune-tb-")
        runs = train(os.path.abspath(args.moontune), work)
    failed = []
    try:
        for run in runs:
            failed += check_run(run)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit("FAILED:\n  " + "\n  ".join(failed))
    print("TensorBoard events: all checks passed")


if __name__ == "__main__":
    main()
