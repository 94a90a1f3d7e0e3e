#!/usr/bin/env python3
"""Reference for the dpo loss plugin (direct preference optimisation on a LoRA policy).

    pip install torch transformers safetensors peft    # CPU is enough
    python3 tests/parity/make_dpo_reference.py

Writes tests/fixtures/dpo/reference.safetensors.

Model: tests/fixtures/tiny_gqa (LlamaForCausalLM, eager attention) with PEFT LoRA
r=4, lora_alpha=8, target_modules="all-linear", dropout 0 -- the adapter of
tests/fixtures/lora/reference.safetensors, whose init.<name> values are loaded (not
redrawn). Everything is computed in float64 (model loaded with dtype=float64, LoRA
values converted to float64) and stored as float32; tokens and targets as int32.

Batch: P=3 preference pairs, T=12. Row 2i is pair i's chosen sequence, row 2i+1 its
rejected one. Both share the prompt (lengths 3, 5, 4); the answers (chosen lengths
5, 4, 7, rejected 6, 3, 5) differ. Tokens come from
torch.Generator().manual_seed(2024), uniform in [1, vocab), drawn per pair in the
order prompt, chosen answer, rejected answer; padding after the answer is token 0
(no attention mask: the model is causal and padding only follows the answer).
targets are pre-shifted and aligned with the logits rows: targets[b,t] = tokens[b,t+1]
when t+1 is an answer position, else -100. Each sequence has answer_len targets.

Per sequence, logp = sum over t with targets[b,t] >= 0 of log_softmax(logits[b,t])[target].
The policy is the PEFT model with its adapters on; the reference is the same model
inside `with model.disable_adapter():` under torch.no_grad (no gradient flows into it).
base_logps come from a plain LlamaForCausalLM without PEFT and must equal the
adapters-disabled logps to 1e-12.

The loss follows TRL's DPOTrainer.dpo_loss (TRL needs no GPU, but it is not installed
where this was made, so the formulas are written out here in PyTorch). Per pair, with
pc, pr the policy logps of chosen and rejected and rc, rr the reference ones:

    ipo only: every logp (policy and reference) is first divided by its number of
              answer tokens
    x = (pc - pr) - (rc - rr),  h = beta * x,  eps = label_smoothing
    sigmoid: -logsigmoid(h) * (1 - eps) - logsigmoid(-h) * eps
    robust:  (-logsigmoid(h) * (1 - eps) + logsigmoid(-h) * eps) / (1 - 2 eps)
    hinge:   relu(1 - h)          (the script asserts |1 - h| > 1e-3: off the kink)
    ipo:     (x - 1 / (2 beta))^2
    loss = mean over pairs  [+ rpo_alpha * nll_loss when rpo_alpha > 0]
    nll_loss = mean over all chosen-answer target tokens (all pairs together) of
               -log p(target), policy with adapters on

Metrics (means over pairs; ipo uses its length-averaged logps):
rewards/chosen = beta*(pc - rc), rewards/rejected = beta*(pr - rr),
rewards/accuracies = float(reward_chosen > reward_rejected),
rewards/margins = reward_chosen - reward_rejected, logps/chosen = pc,
logps/rejected = pr, and nll_loss (recorded for every case).

Cases (name: loss_type, beta, label_smoothing, rpo_alpha):
    sigmoid: sigmoid 0.1 0   0      cdpo:   sigmoid 0.5 0.2 0
    robust:  robust  0.5 0.2 0      hinge:  hinge   0.5 0   0
    ipo:     ipo     0.5 0   0      rpo:    sigmoid 0.1 0   0.5

Contents: tokens, targets (int32, (6,12)), policy_logps, ref_logps, base_logps (6,),
and per case C: C.loss (1,), C.<metric> (1,) for the 7 metric names, and
C.grad.<name> for each of the 28 lora_A / lora_B tensors (gradient of C.loss, grads
zeroed between cases). Names are PEFT's without "base_model.model.", as in the lora
fixture. The case table is in the metadata (case.<C>); the metadata keys are sorted
and the script runs on one thread, so a second run writes the same bytes.

Note: transformers' Llama rotary embedding computes its angles and cos/sin in float32
even for a float64 model; the fixture keeps that (as the lora fixture's fp64 check does).
"""
import json
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import peft
import peft_parity
from peft_parity import fmt, plain_name, rel, write_sorted_metadata

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny_gqa")
LORA_REF = os.path.join(ROOT, "tests", "fixtures", "lora", "reference.safetensors")
OUT = os.path.join(ROOT, "tests", "fixtures", "dpo", "reference.safetensors")
GENERATOR = "tests/parity/make_dpo_reference.py"

R, ALPHA = 4, 8.0
IGNORE = -100
T = 12
SEED = 2024
PROMPT_LENS = [3, 5, 4]
CHOSEN_LENS = [5, 4, 7]
REJECTED_LENS = [6, 3, 5]

# name: (loss_type, beta, label_smoothing, rpo_alpha)
CASES = {
    "sigmoid": ("sigmoid", 0.1, 0.0, 0.0),
    "cdpo": ("sigmoid", 0.5, 0.2, 0.0),
    "robust": ("robust", 0.5, 0.2, 0.0),
    "hinge": ("hinge", 0.5, 0.0, 0.0),
    "ipo": ("ipo", 0.5, 0.0, 0.0),
    "rpo": ("sigmoid", 0.1, 0.0, 0.5),
}
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "nll_loss"]


# ---------------------------------------------------------------------------
# batch
# ---------------------------------------------------------------------------

def make_batch(vocab):
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.zeros(2 * len(PROMPT_LENS), T, dtype=torch.long)
    targets = torch.full((2 * len(PROMPT_LENS), T), IGNORE, dtype=torch.long)
    for i, (pl, cl, rl) in enumerate(zip(PROMPT_LENS, CHOSEN_LENS, REJECTED_LENS)):
        prompt = torch.randint(1, vocab, (pl,), generator=g)
        chosen = torch.randint(1, vocab, (cl,), generator=g)
        rejected = torch.randint(1, vocab, (rl,), generator=g)
        assert cl != rl or not torch.equal(chosen, rejected)
        for row, ans in ((2 * i, chosen), (2 * i + 1, rejected)):
            n = pl + ans.numel()
            assert n <= T
            tokens[row, :pl] = prompt
            tokens[row, pl:n] = ans
            for t in range(pl - 1, n - 1):
                targets[row, t] = tokens[row, t + 1]
    return tokens, targets


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------

def peft_model(dtype, init):
    return peft_parity.peft_model(MODEL, R, ALPHA, dtype, init)


def seq_logps(logits, targets):
    """Sum over the target positions of each row of log_softmax(logits)[target]."""
    lp = F.log_softmax(logits, dim=-1)
    mask = targets != IGNORE
    tok = lp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok)).sum(-1)


def dpo(policy, ref, counts, loss_type, beta, eps, rpo_alpha):
    """TRL DPOTrainer.dpo_loss and its metrics. policy/ref: (2P,) summed logps."""
    nll = -policy[0::2].sum() / counts[0::2].sum()
    if loss_type == "ipo":
        policy, ref = policy / counts, ref / counts
    pc, pr, rc, rr = policy[0::2], policy[1::2], ref[0::2], ref[1::2]
    x = (pc - pr) - (rc - rr)
    h = beta * x
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(h) * (1 - eps) - F.logsigmoid(-h) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(h) * (1 - eps) + F.logsigmoid(-h) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        kink = (1 - h).abs().min().item()
        assert kink > 1e-3, f"hinge: a pair is within {kink:.3g} of the kink"
        losses = torch.relu(1 - h)
    elif loss_type == "ipo":
        losses = (x - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    loss = losses.mean()
    if rpo_alpha > 0:
        loss = loss + rpo_alpha * nll
    with torch.no_grad():
        rw_c, rw_r = beta * (pc - rc), beta * (pr - rr)
        metrics = {
            "rewards/chosen": rw_c.mean(),
            "rewards/rejected": rw_r.mean(),
            "rewards/accuracies": (rw_c > rw_r).to(rw_c.dtype).mean(),
            "rewards/margins": (rw_c - rw_r).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
            "nll_loss": nll,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}, h.detach()


def run_all(dtype, init, tokens, targets):
    """Reference logps, then each case's loss, metrics and LoRA gradients."""
    model = peft_model(dtype, init)
    counts = (targets != IGNORE).sum(-1).to(dtype)
    with torch.no_grad(), model.disable_adapter():
        ref = seq_logps(model(input_ids=tokens).logits, targets)
    results = {}
    policy = None
    for name, (loss_type, beta, eps, rpo_alpha) in CASES.items():
        model.zero_grad(set_to_none=True)
        pol = seq_logps(model(input_ids=tokens).logits, targets)
        loss, metrics, h = dpo(pol, ref, counts, loss_type, beta, eps, rpo_alpha)
        loss.backward()
        grads = {plain_name(n): p.grad.detach().clone()
                 for n, p in model.named_parameters() if "lora_" in n}
        results[name] = (loss.detach(), metrics, grads, h)
        policy = pol.detach()
    return policy, ref, results


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lora = load_file(LORA_REF)
    init = {k[len("init."):]: v for k, v in lora.items() if k.startswith("init.")}
    assert len(init) == 28, len(init)

    vocab = transformers.AutoConfig.from_pretrained(MODEL).vocab_size
    tokens, targets = make_batch(vocab)
    counts = (targets != IGNORE).sum(-1)
    expect = [n for c, r in zip(CHOSEN_LENS, REJECTED_LENS) for n in (c, r)]
    assert counts.tolist() == expect, counts.tolist()
    print(f"vocab {vocab}; tokens:\n{tokens}\ntargets:\n{targets}")

    policy, ref, results = run_all(torch.float64, init, tokens, targets)

    base = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager",
                                            dtype=torch.float64)
    base.eval()
    with torch.no_grad():
        base_logps = seq_logps(base(input_ids=tokens).logits, targets)
    d = (base_logps - ref).abs().max().item()
    print(f"policy logps {policy.tolist()}")
    print(f"ref logps    {ref.tolist()}")
    print(f"base vs adapters-disabled logps: max|d| {d:.3e}")
    assert d <= 1e-12, d

    # float32 sanity: the same computation in float32, against the float64 values
    _, ref32, res32 = run_all(torch.float32, init, tokens, targets)
    print(f"fp32 vs fp64 ref logps norm-rel {rel(ref32, ref):.3e}")

    out = {"tokens": tokens.to(torch.int32).contiguous(),
           "targets": targets.to(torch.int32).contiguous(),
           "policy_logps": policy.float().contiguous(),
           "ref_logps": ref.float().contiguous(),
           "base_logps": base_logps.float().contiguous()}
    meta = {"generator": GENERATOR, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "seed": str(SEED), "prompt_lens": json.dumps(PROMPT_LENS),
            "chosen_lens": json.dumps(CHOSEN_LENS), "rejected_lens": json.dumps(REJECTED_LENS),
            "lora_init": "tests/fixtures/lora/reference.safetensors init.*",
            "r": str(R), "lora_alpha": repr(ALPHA), "dtype": "computed in float64, stored float32"}
    for name, (loss_type, beta, eps, rpo_alpha) in CASES.items():
        meta["case." + name] = (f"loss_type={loss_type} beta={fmt(beta)} "
                                f"label_smoothing={fmt(eps)} rpo_alpha={fmt(rpo_alpha)}")
        loss, metrics, grads, h = results[name]
        l32, _, g32, _ = res32[name]
        worst = max((rel(g32[n], grads[n]), n) for n in grads)
        nonzero = sum(int(g.abs().max() > 0) for g in grads.values())
        print(f"\n[{name}] {meta['case.' + name]}")
        print(f"  loss {loss.item()!r}   (h = beta*x per pair: {[round(v, 6) for v in h.tolist()]})")
        for m in METRICS:
            print(f"  {m:20s} {metrics[m].item()!r}")
        print(f"  fp32 vs fp64: loss rel {abs(l32.item() - loss.item()) / abs(loss.item()):.3e}, "
              f"worst grad norm-rel {worst[0]:.3e} ({worst[1]}); non-zero grads {nonzero}/28")
        assert nonzero == 28, name
        out[f"{name}.loss"] = loss.reshape(1).float().contiguous()
        for m in METRICS:
            out[f"{name}.{m}"] = metrics[m].reshape(1).float().contiguous()
        for n, g in grads.items():
            out[f"{name}.grad.{n}"] = g.float().contiguous()

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata=meta)
    write_sorted_metadata(OUT)
    check = load_file(OUT)
    assert set(check) == set(out) and all(torch.equal(check[k], out[k]) for k in out)
    print(f"\nwrote {OUT}: {len(out)} tensors")


if __name__ == "__main__":
    main()
