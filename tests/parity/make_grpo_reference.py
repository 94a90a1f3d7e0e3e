#!/usr/bin/env python3
"""Reference for the grpo loss plugin (GRPO / DAPO / Dr. GRPO on a LoRA policy).

    pip install torch transformers safetensors peft numpy    # CPU is enough
    python3 tests/parity/make_grpo_reference.py

Writes tests/fixtures/grpo/reference.safetensors.

Model: tests/fixtures/tiny_gqa (LlamaForCausalLM, eager attention) with PEFT LoRA
r=4, lora_alpha=8, target_modules="all-linear", dropout 0 -- the adapter of
tests/fixtures/lora/reference.safetensors, whose init.<name> values are loaded (not
redrawn; their lora_B are non-zero, so the policy differs from the reference, the model
with the adapters disabled). Everything is computed in float64 (model loaded with
dtype=float64, LoRA values converted to float64) and stored as float32; tokens and
targets as int32.

Batch: B=5 rows, T=12, a rollout batch. Rows 0-3 are a prompt (lengths 3, 4, 2, 5) then
a completion (lengths 6, 8, 4, 7); row 4 is a padding row (all tokens 0, no target,
advantage NaN). Tokens come from torch.Generator().manual_seed(2026), uniform in
[1, vocab), drawn per row in the order prompt, completion; padding after the completion
is token 0 (no attention mask: the model is causal and padding only follows). targets
are pre-shifted and aligned with the logits rows: targets[b,t] = tokens[b,t+1] when t+1
is a completion position, else -100, so each row has completion_len targets.

advantages = [1.3, -0.8, 0.4, -1.5, NaN] (stored float32, used as stored).
temperature = 0.7 in every case. The per-token log-probabilities are
log_softmax(logits / temperature)[target]. old_logps (the sampling policy's, as the
sampler recorded them) = the policy's own per-token logps (adapters on) plus noise drawn
after the tokens from the same generator, uniform in [-0.4, 0.4], 0 where there is no
target; stored float32 and used as stored (float32 values widened to float64), so the
plugin and this reference start from the same numbers. The noise makes ratios that are
clipped on both sides: the script asserts at least one low-clipped token (A < 0,
ratio < 1 - epsilon) and one high-clipped token (A > 0, ratio > 1 + epsilon_high) for
every epsilon_high used, that the two epsilon_high values clip different numbers of
tokens, and that no ratio lies within 1e-3 of a clip boundary (where float32 rounding in
the plugin could flip a token's side).

The loss follows the formulas of TRL's GRPOTrainer._compute_loss (token-level
importance sampling; TRL is not installed where this was made, so the formulas are
written out here in PyTorch). Per target token, with logp the policy's (adapters on),
old the sampling log-probability, A the row's advantage and ref the reference's logp
(`with model.disable_adapter():` under torch.no_grad, same temperature):

    ratio   = exp(logp - old)
    clipped = clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.minimum(ratio * A, clipped * A)
    if beta > 0: per_token_loss += beta * (exp(ref - logp) - (ref - logp) - 1)   (k3)

    grpo:    mean over rows with a target of (sum_t per_token_loss / n_targets(row))
    dapo:    sum over all target tokens / number of target tokens
    dr_grpo: sum over all target tokens / (rows with a target * max_completion_length)

TRL has no padding rows (every row is a completion); here the padding row counts for
nothing, as in the plugin: grpo's mean and dr_grpo's row count cover the rows that have
a target.

Metrics (means over the target tokens of the batch, TRL's names):
kl = mean k3 KL (beta > 0 only), clip_ratio/low_mean = fraction with ratio < 1 - epsilon
and A < 0, clip_ratio/high_mean = ratio > 1 + epsilon_high and A > 0,
clip_ratio/region_mean = either.

Cases (name: loss_type, beta, epsilon, epsilon_high, max_completion_length):
    grpo:       grpo    0.04  0.2  0.2   0
    dapo:       dapo    0.04  0.2  0.28  0
    dr_grpo:    dr_grpo 0     0.2  0.2   10
    dapo_beta0: dapo    0     0.2  0.2   0

Contents: tokens, targets (int32, (5,12)), advantages (5,), old_logps, policy_logps,
ref_logps ((5,12), 0 where there is no target; policy and reference at the
temperature), and per case C: C.loss (1,), C.<metric> (1,) for its metrics (kl only
where beta > 0), and C.grad.<name> for each of the 28 lora_A / lora_B tensors (gradient
of C.loss, grads zeroed between cases). Names are PEFT's without "base_model.model.", as
in the lora fixture. The case table is in the metadata (case.<C>); the metadata keys are
sorted and the script runs on one thread, so a second run writes the same bytes.

Note: transformers' Llama rotary embedding computes its angles and cos/sin in float32
even for a float64 model; the fixture keeps that (as the lora and dpo fixtures do).
"""
import json
import math
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import peft
import peft_parity
from peft_parity import fmt, plain_name, rel, write_sorted_metadata

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny_gqa")
LORA_REF = os.path.join(ROOT, "tests", "fixtures", "lora", "reference.safetensors")
OUT = os.path.join(ROOT, "tests", "fixtures", "grpo", "reference.safetensors")
GENERATOR = "tests/parity/make_grpo_reference.py"

R, ALPHA = 4, 8.0
IGNORE = -100
T = 12
SEED = 2026
PROMPT_LENS = [3, 4, 2, 5]
COMPLETION_LENS = [6, 8, 4, 7]
ADVANTAGES = [1.3, -0.8, 0.4, -1.5]
NOISE = 0.4
TEMPERATURE = 0.7
MARGIN = 1e-3

# name: (loss_type, beta, epsilon, epsilon_high, max_completion_length)
CASES = {
    "grpo": ("grpo", 0.04, 0.2, 0.2, 0),
    "dapo": ("dapo", 0.04, 0.2, 0.28, 0),
    "dr_grpo": ("dr_grpo", 0.0, 0.2, 0.2, 10),
    "dapo_beta0": ("dapo", 0.0, 0.2, 0.2, 0),
}
CLIP_METRICS = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]


def metric_names(beta):
    return CLIP_METRICS + (["kl"] if beta > 0 else [])


# ---------------------------------------------------------------------------
# batch
# ---------------------------------------------------------------------------

def make_batch(vocab, g):
    rows = len(PROMPT_LENS) + 1  # + a padding row
    tokens = torch.zeros(rows, T, dtype=torch.long)
    targets = torch.full((rows, T), IGNORE, dtype=torch.long)
    for b, (pl, cl) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        prompt = torch.randint(1, vocab, (pl,), generator=g)
        completion = torch.randint(1, vocab, (cl,), generator=g)
        n = pl + cl
        assert n <= T
        tokens[b, :pl] = prompt
        tokens[b, pl:n] = completion
        for t in range(pl - 1, n - 1):
            targets[b, t] = tokens[b, t + 1]
    return tokens, targets


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------

def peft_model(dtype, init):
    return peft_parity.peft_model(MODEL, R, ALPHA, dtype, init)


def token_logps(model, tokens, targets):
    """log_softmax(logits / temperature)[target] per position; 0 where there is no target."""
    logits = model(input_ids=tokens).logits / TEMPERATURE
    lp = F.log_softmax(logits, dim=-1)
    tok = lp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE, tok, torch.zeros_like(tok))


def grpo(logp, old, ref, adv, mask, loss_type, beta, eps, eps_high, max_len):
    """The loss of TRL's GRPOTrainer._compute_loss and its metrics. logp, old, ref: (B,T)
    per-token logps; adv (B,) with the padding rows' NaN replaced by 0; mask (B,T)."""
    A = adv.unsqueeze(-1)
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    if beta > 0:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    zero = torch.zeros_like(per_token)
    per_token = torch.where(mask, per_token, zero)
    n = mask.sum(-1)
    has = n > 0
    if loss_type == "grpo":
        loss = (per_token.sum(-1)[has] / n[has].to(per_token.dtype)).mean()
    elif loss_type == "dapo":
        loss = per_token.sum() / mask.sum()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (has.sum() * max_len)
    else:
        raise ValueError(loss_type)
    with torch.no_grad():
        low = (ratio < 1 - eps) & (A < 0) & mask
        high = (ratio > 1 + eps_high) & (A > 0) & mask
        tokens = mask.sum().to(per_token.dtype)
        metrics = {
            "clip_ratio/low_mean": low.sum() / tokens,
            "clip_ratio/high_mean": high.sum() / tokens,
            "clip_ratio/region_mean": (low | high).sum() / tokens,
        }
        if beta > 0:
            metrics["kl"] = torch.where(mask, kl, zero).sum() / tokens
    return loss, {k: v.detach() for k, v in metrics.items()}, ratio.detach()


def run_all(dtype, init, tokens, targets, adv, old):
    """Policy and reference logps, then each case's loss, metrics and LoRA gradients."""
    model = peft_model(dtype, init)
    mask = targets != IGNORE
    adv = torch.nan_to_num(adv.to(dtype), nan=0.0)
    old = old.to(dtype)
    with torch.no_grad(), model.disable_adapter():
        ref = token_logps(model, tokens, targets)
    with torch.no_grad():
        policy = token_logps(model, tokens, targets)
    results = {}
    for name, (loss_type, beta, eps, eps_high, max_len) in CASES.items():
        model.zero_grad(set_to_none=True)
        logp = token_logps(model, tokens, targets)
        loss, metrics, ratio = grpo(logp, old, ref, adv, mask, loss_type, beta, eps,
                                    eps_high, max_len)
        loss.backward()
        grads = {plain_name(n): p.grad.detach().clone()
                 for n, p in model.named_parameters() if "lora_" in n}
        results[name] = (loss.detach(), metrics, grads, ratio)
    return policy, ref, results


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lora = load_file(LORA_REF)
    init = {k[len("init."):]: v for k, v in lora.items() if k.startswith("init.")}
    assert len(init) == 28, len(init)
    assert all(v.abs().max() > 0 for k, v in init.items() if "lora_B" in k), \
        "lora_B is zero in the lora fixture: the policy would equal the reference"

    vocab = transformers.AutoConfig.from_pretrained(MODEL).vocab_size
    g = torch.Generator().manual_seed(SEED)
    tokens, targets = make_batch(vocab, g)
    noise = torch.rand(tokens.shape, generator=g, dtype=torch.float64) * (2 * NOISE) - NOISE
    mask = targets != IGNORE
    counts = mask.sum(-1)
    assert counts.tolist() == COMPLETION_LENS + [0], counts.tolist()
    assert max(COMPLETION_LENS) <= min(c[4] for c in CASES.values() if c[4] > 0)
    adv = torch.tensor(ADVANTAGES + [math.nan], dtype=torch.float32)
    print(f"vocab {vocab}; tokens:\n{tokens}\ntargets:\n{targets}")

    # the sampling policy's logps: the policy's own, perturbed, as stored (float32)
    with torch.no_grad():
        policy64 = token_logps(peft_model(torch.float64, init), tokens, targets)
    old = torch.where(mask, policy64 + noise, torch.zeros_like(policy64)).float()

    policy, ref, results = run_all(torch.float64, init, tokens, targets, adv, old)
    assert torch.equal(policy, policy64)
    d = (policy - ref)[mask].abs().max().item()
    print(f"policy vs reference per-token logps: max|d| {d:.3e}")
    assert d > 1e-3, "the adapter does not move the policy away from the reference"

    # clipping on both sides, and no ratio near a boundary
    ratio = torch.exp(policy - old.double())[mask]
    a_tok = adv.double().unsqueeze(-1).expand_as(policy)[mask]
    bounds = sorted({1 - c[2] for c in CASES.values()} | {1 + c[3] for c in CASES.values()})
    gap = min((ratio - b).abs().min().item() for b in bounds)
    print(f"ratios {[round(r, 4) for r in ratio.tolist()]}\nclosest to a clip boundary "
          f"{bounds}: {gap:.3g}")
    assert gap > MARGIN, gap
    highs = {}
    for name, (_, _, eps, eps_high, _) in CASES.items():
        low = ((ratio < 1 - eps) & (a_tok < 0)).sum().item()
        high = ((ratio > 1 + eps_high) & (a_tok > 0)).sum().item()
        print(f"  {name}: {low} low-clipped, {high} high-clipped of {ratio.numel()} tokens")
        assert low >= 1 and high >= 1, name
        highs[eps_high] = high
    assert len(set(highs.values())) == len(highs), f"epsilon_high changes nothing: {highs}"

    # float32 sanity: the same computation in float32, against the float64 values
    _, ref32, res32 = run_all(torch.float32, init, tokens, targets, adv, old)
    print(f"fp32 vs fp64 ref logps norm-rel {rel(ref32, ref):.3e}")

    out = {"tokens": tokens.to(torch.int32).contiguous(),
           "targets": targets.to(torch.int32).contiguous(),
           "advantages": adv.contiguous(),
           "old_logps": old.contiguous(),
           "policy_logps": policy.float().contiguous(),
           "ref_logps": ref.float().contiguous()}
    meta = {"generator": GENERATOR, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "seed": str(SEED), "prompt_lens": json.dumps(PROMPT_LENS),
            "completion_lens": json.dumps(COMPLETION_LENS),
            "advantages": json.dumps(ADVANTAGES + ["NaN"]), "noise": repr(NOISE),
            "temperature": repr(TEMPERATURE),
            "lora_init": "tests/fixtures/lora/reference.safetensors init.*",
            "r": str(R), "lora_alpha": repr(ALPHA), "dtype": "computed in float64, stored float32"}
    for name, (loss_type, beta, eps, eps_high, max_len) in CASES.items():
        meta["case." + name] = (f"loss_type={loss_type} beta={fmt(beta)} epsilon={fmt(eps)} "
                                f"epsilon_high={fmt(eps_high)} "
                                f"max_completion_length={max_len} "
                                f"temperature={fmt(TEMPERATURE)}")
        loss, metrics, grads, _ = results[name]
        l32, _, g32, _ = res32[name]
        worst = max((rel(g32[n], grads[n]), n) for n in grads)
        nonzero = sum(int(g.abs().max() > 0) for g in grads.values())
        print(f"\n[{name}] {meta['case.' + name]}")
        print(f"  loss {loss.item()!r}")
        for m in metric_names(beta):
            print(f"  {m:24s} {metrics[m].item()!r}")
        print(f"  fp32 vs fp64: loss rel {abs(l32.item() - loss.item()) / abs(loss.item()):.3e}, "
              f"worst grad norm-rel {worst[0]:.3e} ({worst[1]}); non-zero grads {nonzero}/28")
        assert nonzero == 28, name
        out[f"{name}.loss"] = loss.reshape(1).float().contiguous()
        for m in metric_names(beta):
            out[f"{name}.{m}"] = metrics[m].reshape(1).float().contiguous()
        for n, grad in grads.items():
            out[f"{name}.grad.{n}"] = grad.float().contiguous()

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata=meta)
    write_sorted_metadata(OUT)
    check = load_file(OUT)
    # (advantages hold a NaN, which torch.equal never finds equal)
    assert set(check) == set(out) and all(
        torch.equal(check[k].nan_to_num(), out[k].nan_to_num()) for k in out)
    print(f"\nwrote {OUT}: {len(out)} tensors")


if __name__ == "__main__":
    main()
