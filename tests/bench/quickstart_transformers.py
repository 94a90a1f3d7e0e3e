#!/usr/bin/env python3
"""The quickstart recipe's job with Hugging Face transformers + PEFT: the reference side.

    tests/bench/quickstart_transformers.py --phase train [--gguf PATH | --hf-dir DIR]
        [--threads 2] [--max-steps N] [--json FILE]
    tests/bench/quickstart_transformers.py --phase generate [--adapter DIR]
        [--gen-batch 32] [--max-new-tokens 64] [--limit N] [--threads 2] [--json FILE]

Run it with the venv that has torch, transformers, peft, accelerate and gguf (PyPI),
e.g. /tmp/torchenv/bin/python. It does what recipes/quickstart.lua does, the way a user
of transformers would, so that the numbers can be set beside moontune's:

  train     LoRA (r 16, alpha 32, dropout 0, PEFT's "all-linear") on
            data/quickstart/train.jsonl with Trainer: batch 4, one epoch, AdamW (lr 1e-3,
            weight decay 0), cosine schedule with 5% warmup, fp32, seed 42, rows cut at
            256 tokens, loss on the assistant answer only, DataCollatorForSeq2Seq padding
            each batch to its longest row. No evaluation, no checkpoints. Only
            trainer.train() is timed. Reports the examples, the data tokens seen (the
            attention-mask ones of every batch, Trainer's non-padding count), seconds,
            tokens/s, steps, the last step's loss and the mean loss, and peak RSS.
            Rows are not packed (moontune's batcher packs them, so it takes fewer steps).
  generate  greedy answers to the held-out requests (data/quickstart/heldout.jsonl),
            batched with left padding, stopping at eos / <|im_end|>, under
            torch.inference_mode(); with --adapter, through that PEFT adapter (moontune's
            quickstart writes one to runs/quickstart/adapter). Reports the generated
            tokens (per sequence up to and including its first stop token), seconds,
            tokens/s, exact-match accuracy (stripped text) and JSON-equality accuracy.

The prompts are the model's own chat template (apply_chat_template): the prompt is the
system and user messages with the generation prompt, the training row all three
messages; the prompt's tokens must be a prefix of the row's. The model is the GGUF file
that moontune's quickstart uses (transformers dequantizes it to fp32), or a Hugging Face
directory with --hf-dir. Peak RSS is the process's (ru_maxrss), model loading included;
the peak once the model is loaded, before the timed part, is reported beside it.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

DEFAULT_GGUF = "/root/.cache/moontune/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_DATA = os.path.join(REPO, "data", "quickstart", "train.jsonl")
HELDOUT_DATA = os.path.join(REPO, "data", "quickstart", "heldout.jsonl")
STOP_TOKEN = "<|im_end|>"

# recipes/quickstart.lua's settings
SEQ_LEN = 256
BATCH = 4
GRAD_ACCUM = 1
EPOCHS = 1
LR = 1e-3
WARMUP_RATIO = 0.05
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
SEED = 42


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=("train", "generate"), required=True)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--gguf", default=DEFAULT_GGUF, help="GGUF model file (default %(default)s)")
    model.add_argument("--hf-dir", help="Hugging Face model directory instead of the GGUF")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="train: stop after N optimizer steps (default: the whole epoch)")
    p.add_argument("--adapter", help="generate: PEFT adapter directory to apply to the model")
    p.add_argument("--gen-batch", type=int, default=32,
                   help="generate: sequences per batch (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="generate: answer length cap (default %(default)s)")
    p.add_argument("--limit", type=int, help="generate: only the first N held-out prompts")
    p.add_argument("--json", help="also write every number to this JSON file")
    return p.parse_args()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def environment(args):
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cpu": cpu_model(), "threads": args.threads,
            "model": args.hf_dir or args.gguf}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def model_location(args):
    """(directory, from_pretrained keyword arguments) of the model to load."""
    if args.hf_dir:
        return args.hf_dir, {}
    if not os.path.isfile(args.gguf):
        sys.exit(f"error: no GGUF file at {args.gguf} (scripts/fetch-model downloads it)")
    return os.path.dirname(os.path.abspath(args.gguf)), {"gguf_file": os.path.basename(args.gguf)}


def load_tokenizer(args):
    where, kwargs = model_location(args)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if not tokenizer.chat_template:
        sys.exit(f"error: the tokenizer loaded from {args.hf_dir or args.gguf} has no chat "
                 "template")
    return tokenizer


def load_model(args):
    """The model in fp32. From a GGUF, transformers dequantizes every weight but leaves the
    model marked as quantized, and Trainer refuses to train a model so marked: the mark is
    dropped here, once it is clear that no weight stayed packed."""
    where, kwargs = model_location(args)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        dense = all(p.dtype == torch.float32 for p in model.parameters())
        if getattr(quantizer, "packed_modules", None) or not dense:
            sys.exit(f"error: the model from {args.hf_dir or args.gguf} keeps quantized weights; "
                     "this benchmark needs every weight dense in fp32")
        quantizer.remove_quantization_config(model)
    return model


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def chat_ids(tokenizer, messages, generation_prompt):
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_record(record):
    """(prompt messages, reference answer) of a {"messages": [system, user, assistant]} record."""
    messages = record["messages"]
    if messages[-1]["role"] != "assistant":
        sys.exit(f"error: record does not end with an assistant message: {record}")
    return messages[:-1], messages[-1]["content"]


def training_row(tokenizer, record):
    """(input ids, labels) of a whole conversation, labels -100 on the prompt."""
    prompt_messages, _ = split_record(record)
    prompt = chat_ids(tokenizer, prompt_messages, True)
    full = chat_ids(tokenizer, record["messages"], False)
    if full[:len(prompt)] != prompt:
        sys.exit("error: the chat template's prompt tokens are not a prefix of the full "
                 f"conversation's tokens for record {record}")
    return full, [-100] * len(prompt) + full[len(prompt):]


def train(args):
    tokenizer = load_tokenizer(args)
    records = read_records(TRAIN_DATA)
    rows = [training_row(tokenizer, r) for r in records]
    truncated = sum(len(ids) > SEQ_LEN for ids, _ in rows)
    examples = []
    for ids, labels in rows:
        ids, labels = ids[:SEQ_LEN], labels[:SEQ_LEN]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    transformers.set_seed(SEED)  # the LoRA weights are drawn in get_peft_model
    model = get_peft_model(load_model(args), LoraConfig(task_type="CAUSAL_LM", **LORA))
    load_rss = peak_rss_mib()
    with tempfile.TemporaryDirectory() as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=GRAD_ACCUM, num_train_epochs=EPOCHS,
            max_steps=args.max_steps, learning_rate=LR, weight_decay=0.0,
            lr_scheduler_type="cosine", warmup_steps=WARMUP_RATIO,  # < 1: a ratio in transformers 5
            seed=SEED, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[],
            dataloader_num_workers=0, use_cpu=True, include_num_input_tokens_seen="non_padding")
        trainer = Trainer(model=model, args=training_args, train_dataset=examples,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                          processing_class=tokenizer)
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    step_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    tokens = trainer.state.num_input_tokens_seen
    settings = {"seq_len": SEQ_LEN, "batch": BATCH, "grad_accum": GRAD_ACCUM, "epochs": EPOCHS,
                "lr": LR, "warmup_ratio": WARMUP_RATIO, "lora": LORA, "seed": SEED,
                "max_steps": args.max_steps}
    return {"settings": settings, "examples": len(examples), "truncated_examples": truncated,
            "tokens": tokens, "train_seconds": seconds, "tokens_per_second": tokens / seconds,
            "steps": output.global_step, "final_loss": step_losses[-1],
            "mean_loss": output.training_loss, "load_peak_rss_mib": load_rss,
            "peak_rss_mib": peak_rss_mib()}


def stop_token_ids(tokenizer):
    ids = {tokenizer.eos_token_id}
    if STOP_TOKEN in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(STOP_TOKEN))
    ids.discard(None)
    if not ids:
        sys.exit(f"error: the tokenizer has neither an eos token nor {STOP_TOKEN}")
    return sorted(ids)


def answer_length(ids, stop_ids):
    """Tokens of a generated row up to and including its first stop token (all if none)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return i + 1
    return len(ids)


def json_equal(output, reference):
    try:
        return json.loads(output) == json.loads(reference)
    except ValueError:
        return False


def generate_batch(model, tokenizer, prompts, args, stop_ids):
    """(answers, generated token counts) for a list of prompt message lists."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=pad_id)
    answers, counts = [], []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        n = answer_length(row, stop_ids)
        text_ids = row[:n - 1] if row[n - 1] in stop_ids else row[:n]
        answers.append(tokenizer.decode(text_ids, skip_special_tokens=True))
        counts.append(n)
    return answers, counts


def generate(args):
    tokenizer = load_tokenizer(args)
    tokenizer.padding_side = "left"
    model = load_model(args)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    records = read_records(HELDOUT_DATA)[:args.limit]
    items = [split_record(r) for r in records]
    stop_ids = stop_token_ids(tokenizer)
    load_rss = peak_rss_mib()
    answers, counts = [], []
    start = time.perf_counter()
    for i in range(0, len(items), args.gen_batch):
        batch_answers, batch_counts = generate_batch(
            model, tokenizer, [m for m, _ in items[i:i + args.gen_batch]], args, stop_ids)
        answers += batch_answers
        counts += batch_counts
    seconds = time.perf_counter() - start
    exact = sum(a.strip() == ref.strip() for a, (_, ref) in zip(answers, items))
    as_json = sum(json_equal(a, ref) for a, (_, ref) in zip(answers, items))
    tokens = sum(counts)
    return {"adapter": args.adapter, "prompts": len(items), "gen_batch": args.gen_batch,
            "max_new_tokens": args.max_new_tokens, "generated_tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds,
            "exact_correct": exact, "exact_accuracy": exact / len(items),
            "json_correct": as_json, "json_accuracy": as_json / len(items),
            "load_peak_rss_mib": load_rss, "peak_rss_mib": peak_rss_mib(), "outputs": answers}


def print_summary(phase, env, r):
    print(f"\nquickstart with transformers {env['transformers']}, peft {env['peft']}, "
          f"torch {env['torch']}; {env['threads']} threads on {env['cpu']}")
    print(f"model: {env['model']}")
    if phase == "train":
        print(f"train: {r['examples']} examples ({r['truncated_examples']} cut at {SEQ_LEN} "
              f"tokens), {r['steps']} steps, {r['tokens']} data tokens in "
              f"{r['train_seconds']:.1f} s: {r['tokens_per_second']:.1f} tokens/s")
        print(f"train: final step loss {r['final_loss']:.4f}, mean loss {r['mean_loss']:.4f}, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['load_peak_rss_mib']:.0f} after loading)")
    else:
        print(f"generate{' with adapter ' + r['adapter'] if r['adapter'] else ''}: {r['prompts']} "
              f"prompts, batch {r['gen_batch']}, {r['generated_tokens']} tokens in "
              f"{r['seconds']:.1f} s: {r['tokens_per_second']:.1f} tokens/s")
        print(f"generate: exact match {100 * r['exact_accuracy']:.1f}% ({r['exact_correct']}/"
              f"{r['prompts']}), JSON equal {100 * r['json_accuracy']:.1f}% ({r['json_correct']}/"
              f"{r['prompts']}), peak RSS {r['peak_rss_mib']:.0f} MiB")
        for answer in r["outputs"][:3]:
            print(f"  -> {answer}")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    env = environment(args)
    results = train(args) if args.phase == "train" else generate(args)
    print_summary(args.phase, env, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"phase": args.phase, "environment": env, "results": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
