#!/usr/bin/env python3
"""moontune against PyTorch + PEFT on one shape, on this machine, in one run.

    tests/bench/peft_side_by_side.py [--moontune build/moontune] [--shape smollm2-135m]
        [--batch 4] [--seq 256] [--prompt 0] [--threads 2] [--steps 3] [--warmup 1]
        [--checkpointing]

Both sides run forward + backward steps of the same Llama-family shape with random
weights, fp32, on the same threads, and no optimizer step (`moontune bench` times none):
LoRA (r 16, alpha 32, every linear layer of the blocks, as PEFT's "all-linear") and full
fine-tuning. The loss is the cross-entropy of every position on both sides but the
first --prompt of each row, which have no target, as a prompt (labels -100 on the
PyTorch side, which still computes their logits, as transformers does). Each side
and mode runs in its own process, so that peak resident memory is its own. The machine's
fp32 matrix-product rate (numpy's sgemm, 2048^3, same threads) is measured in the same
run, so the step's rate can be read against it (issue 17: the ratio counts where both
are bound by fp32 products). Needs torch, transformers and peft (PyPI).

moontune recomputes its norms and SwiGLU in backward (its default, `recompute =
"norms"`). --checkpointing recomputes whole layers on both sides: `moontune bench
--recompute layers`, and transformers' `gradient_checkpointing_enable()` (non-reentrant)
on the PyTorch side.

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the children's environment, as
for every benchmark of this project (they pin OpenBLAS to a slower kernel on CI).
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

SHAPES = {  # as core/model/model_config.c's presets
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
                 rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0),
}
LORA_R, LORA_ALPHA = 16, 32


def bench_env(threads):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env["OMP_NUM_THREADS"] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def run_moontune(args, mode):
    cmd = [args.moontune, "bench", "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
           "--prompt", str(args.prompt),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.checkpointing:
        cmd += ["--recompute", "layers"]
    if mode == "lora":
        cmd += ["--adapter", "lora", "--adapter-option", "target_modules=all-linear",
                "--adapter-option", f"r={LORA_R}", "--adapter-option", f"alpha={LORA_ALPHA}"]
    else:
        cmd += ["--mode", "full"]
    out = subprocess.run(cmd, env=bench_env(args.threads), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"peft_side_by_side: {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    line = re.search(r"^(adapter lora|full fine-tuning)\s+([0-9.]+) tokens/s\s+([0-9.]+) GFLOP/s.*$", out.stdout, re.M)
    peak = re.search(r"peak resident memory ([0-9.]+) MiB", out.stdout)
    if not line or not peak:
        sys.exit(f"peft_side_by_side: cannot read moontune bench's output:\n{out.stdout}")
    return {"tokens_per_second": float(line.group(2)), "gflops": float(line.group(3)),
            "peak_mib": float(peak.group(1))}


def torch_child(shape, mode, batch, seq, prompt, threads, steps, warmup, checkpointing):
    """Runs in a child process: prints one JSON line."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    labels = ids.clone()
    labels[:, :prompt + 1] = -100  # position t predicts label t+1: targets from t = prompt, as moontune's
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    per_step = sum(times) / len(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"tokens_per_second": batch * seq / per_step, "peak_mib": peak}))


def run_torch(args, mode):
    cmd = [sys.executable, __file__, "--child", mode, "--shape", args.shape, "--batch", str(args.batch),
           "--seq", str(args.seq), "--prompt", str(args.prompt), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--checkpointing"] if args.checkpointing else [])
    out = subprocess.run(cmd, env=bench_env(args.threads), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"peft_side_by_side: the PyTorch side ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sgemm_rate(threads):
    code = ("import numpy as np, time\n"
            "n = 2048\n"
            "a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)\n"
            "a @ b\n"
            "best = float('inf')\n"
            "for _ in range(5):\n"
            "    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)\n"
            "print(2 * n**3 / best / 1e9)\n")
    out = subprocess.run([sys.executable, "-c", code], env=bench_env(threads), capture_output=True, text=True)
    return float(out.stdout.strip()) if out.returncode == 0 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moontune", default="build/moontune")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true",
                    help="recompute whole layers in backward on both sides")
    ap.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch_child(args.shape, args.child, args.batch, args.seq, args.prompt, args.threads, args.steps,
                    args.warmup, args.checkpointing)
        return
    cpu = "?"
    try:
        cpu = re.search(r"^Model name:\s*(.+)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
                        re.M).group(1)
    except (OSError, AttributeError):
        pass
    rate = sgemm_rate(args.threads)
    print(f"{cpu}; {args.threads} threads; shape {args.shape}, batch {args.batch} x {args.seq} "
          f"(prompt {args.prompt}), fp32{', whole layers recomputed' if args.checkpointing else ''}; "
          f"sgemm 2048^3 (numpy) {rate:.1f} GFLOP/s")
    print(f"{'mode':<6} {'moontune tok/s':>15} {'PEFT tok/s':>11} {'ratio':>6} {'moontune MiB':>13} "
          f"{'PEFT MiB':>9} {'ratio':>6} {'step/sgemm':>11}")
    for mode in ("lora", "full"):
        m, t = run_moontune(args, mode), run_torch(args, mode)
        print(f"{mode:<6} {m['tokens_per_second']:>15.1f} {t['tokens_per_second']:>11.1f} "
              f"{m['tokens_per_second'] / t['tokens_per_second']:>5.2f}x {m['peak_mib']:>13.0f} "
              f"{t['peak_mib']:>9.0f} {m['peak_mib'] / t['peak_mib']:>5.2f}x {m['gflops'] / rate:>10.0%}")


if __name__ == "__main__":
    main()
