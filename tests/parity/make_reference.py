#!/usr/bin/env python3
"""Generate PyTorch / Hugging Face reference fixtures for moontune parity tests.

Run by hand from the repository root (or anywhere):

    python3 tests/parity/make_reference.py

It writes two tiny random float32 models into tests/fixtures/:

  tiny_gqa/   LlamaForCausalLM: grouped-query attention (4 q heads, 2 kv heads),
              explicit head_dim (16) != hidden_size / num_attention_heads (12),
              tied embeddings, llama3 rope scaling hitting all three frequency bands.
  tiny_bias/  Qwen2ForCausalLM: q/k/v biases (o_proj without), untied embeddings,
              GQA (4 q heads, 2 kv heads), default rope, no sliding window.

Each directory gets config.json + model.safetensors (save_pretrained) and
reference.safetensors with tokens, targets, logits, loss, rope_inv_freq and
grad.<parameter name> for every parameter.  See tests/parity/README.md.

Everything is deterministic (fixed seeds, CPU, float32, eager attention).
"""

import copy
import inspect
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")

B, T = 2, 12
IGNORE = -100


# ---------------------------------------------------------------------------
# RoPE helpers (independent float64 re-implementation used for checks)
# ---------------------------------------------------------------------------

def base_inv_freq64(theta, head_dim):
    i = torch.arange(0, head_dim, 2, dtype=torch.float64)
    return 1.0 / (theta ** (i / head_dim))


def llama3_inv_freq64(theta, head_dim, rp):
    """Llama 3.1 rope scaling in float64. Returns (inv_freq, band labels)."""
    inv = base_inv_freq64(theta, head_dim)
    factor = rp["factor"]
    lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    out, bands = [], []
    for f in inv.tolist():
        wl = 2.0 * math.pi / f
        if wl < high_wl:
            out.append(f)
            bands.append("high(unchanged)")
        elif wl > low_wl:
            out.append(f / factor)
            bands.append("low(scaled)")
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1.0 - s) * f / factor + s * f)
            bands.append("medium(smoothed)")
    return torch.tensor(out, dtype=torch.float64), bands


def patch_rope_float64(model, inv_freq64):
    """Make the rotary embedding of a float64 model compute cos/sin in float64.

    Stock HF rotary embeddings always compute angles/cos/sin in float32 (even for a
    float64 model), so the plain .double() copy would share the float32 rope error.
    """
    rot = model.model.rotary_emb
    scaling = float(rot.attention_scaling)

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv_freq64.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

    rot.forward = forward


# ---------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------

def randomise(model, seed):
    """Make RMSNorm weights and biases non-trivial (defaults are ones / zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2] and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32))


def make_batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g, dtype=torch.int64)
    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    targets[:, :-1] = tokens[:, 1:]
    targets[:, -1] = IGNORE          # no next token for the last position
    targets[0, :4] = IGNORE          # masked "prompt" span at the start of row 0
    targets[1, 3] = IGNORE           # a couple of isolated masked positions
    targets[1, 7] = IGNORE
    return tokens.to(torch.int32), targets.to(torch.int32)


def rel(a, b):
    """max|a-b| / max|b| (norm-wise relative error)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def elem_rel(a, b, floor):
    a, b = a.double(), b.double()
    return ((a - b).abs() / (b.abs() + floor)).max().item()


def canonicalise_metadata_order(path):
    """Rewrite the safetensors header with __metadata__ keys sorted.

    safetensors stores metadata in a hash map, so its key order (and thus the file
    bytes) changes from run to run; sorting keeps regenerated files byte-identical.
    The header length is unchanged (same JSON, reordered), so only it is rewritten.
    """
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def save_model_dir(model, out_dir):
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; always on in 5.x
    model.save_pretrained(out_dir, **kwargs)


def build_and_write(name, model_cls, config, seed, inv64, bands=None):
    print(f"\n=== {name}: {model_cls.__name__} ===")
    out_dir = os.path.join(FIXTURES, name)
    os.makedirs(out_dir, exist_ok=True)

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    randomise(model, seed + 1)
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    V = config.vocab_size

    # ---- rope: compare transformers' inv_freq against independent float64 formula
    inv_hf = model.model.rotary_emb.inv_freq.detach().clone().to(torch.float32)
    print("rope inv_freq (transformers, float32):")
    for i, f in enumerate(inv_hf.tolist()):
        band = f"  band={bands[i]}" if bands else ""
        print(f"  [{i}] {f:.9e}  (float64 formula {inv64[i].item():.9e}){band}")
    inv_rel = elem_rel(inv_hf, inv64, 0.0)
    print(f"  max elementwise rel diff transformers-fp32 vs fp64 formula: {inv_rel:.3e}")
    assert inv_rel < 1e-6, "transformers inv_freq disagrees with the llama3/default formula"
    assert float(model.model.rotary_emb.attention_scaling) == 1.0

    # ---- batch, forward, loss, backward (float32)
    tokens, targets = make_batch(V, seed + 2)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens.long()).logits
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).long(), ignore_index=IGNORE)
    loss.backward()
    n_unmasked = int((targets != IGNORE).sum())
    print(f"logits shape {tuple(logits.shape)}, std {logits.std().item():.4f}, "
          f"range [{logits.min().item():.4f}, {logits.max().item():.4f}]")
    print(f"loss (fp32) = {loss.item()!r}  over {n_unmasked} unmasked positions "
          f"(ln V = {math.log(V):.4f})")

    params = list(model.named_parameters())
    ref = {
        "tokens": tokens.contiguous(),
        "targets": targets.contiguous(),
        "logits": logits.detach().to(torch.float32).contiguous(),
        "loss": loss.detach().reshape(1).to(torch.float32).contiguous(),
        "rope_inv_freq": inv_hf.contiguous(),
    }
    for pname, p in params:
        assert p.grad is not None, f"no grad for {pname}"
        ref["grad." + pname] = p.grad.detach().to(torch.float32).contiguous()
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in dict(params), "tied model should not list lm_head.weight"

    # ---- float64 accuracy checks of the fp32 reference
    for label, fix_rope in (("fp64 copy (HF rope, cos/sin in fp32)", False),
                            ("fp64 copy (rope in fp64 too)", True)):
        m64 = copy.deepcopy(model).to(torch.float64)
        m64.zero_grad(set_to_none=True)
        if fix_rope:
            patch_rope_float64(m64, inv64)
        lg64 = m64(input_ids=tokens.long()).logits
        l64 = F.cross_entropy(lg64.reshape(-1, V), targets.reshape(-1).long(), ignore_index=IGNORE)
        l64.backward()
        print(f"{label}:")
        print(f"  logits: max|d| = {(logits.double() - lg64).abs().max().item():.3e}, "
              f"norm-rel = {rel(logits, lg64):.3e}, "
              f"elem-rel(floor 1e-3) = {elem_rel(logits, lg64, 1e-3):.3e}")
        print(f"  loss: fp32 {loss.item()!r} fp64 {l64.item()!r} "
              f"rel = {abs(loss.item() - l64.item()) / abs(l64.item()):.3e}")
        worst = max(((rel(p.grad, q.grad), n) for (n, p), (_, q)
                     in zip(params, m64.named_parameters())))
        print(f"  grads: worst norm-rel = {worst[0]:.3e} ({worst[1]})")
        assert rel(logits, lg64) < 1e-5, "fp32 logits not accurate vs fp64"
        assert worst[0] < 1e-4, "fp32 grads not accurate vs fp64"

    # ---- write the HF model dir and the reference file
    save_model_dir(model, out_dir)
    meta = {
        "generator": "tests/parity/make_reference.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_class": model_cls.__name__,
        "loss": repr(loss.item()),
    }
    ref_path = os.path.join(out_dir, "reference.safetensors")
    save_file(ref, ref_path, metadata=meta)
    canonicalise_metadata_order(ref_path)

    # ---- sanity: reload from the directory and compare against the reference
    re = model_cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32)
    re.eval()
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), re.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), f"reloaded weight differs: {n1}"
        lg_re = re(input_ids=tokens.long()).logits
    with safe_open(ref_path, "pt") as f:
        lg_file = f.get_tensor("logits")
        assert f.metadata() == meta
        n_grads = sum(1 for k in f.keys() if k.startswith("grad."))
    assert torch.equal(lg_re, lg_file), "reloaded model logits != reference logits"
    assert n_grads == len(params)
    print(f"reload check: from_pretrained logits bit-identical to reference "
          f"({n_grads} grad tensors, {sum(p.numel() for _, p in params)} parameters)")

    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        print("model.safetensors tensors:", sorted(f.keys()))
    for fn in sorted(os.listdir(out_dir)):
        print(f"  {fn}: {os.path.getsize(os.path.join(out_dir, fn))} bytes")
    with open(os.path.join(out_dir, "config.json")) as f:
        print("config.json:", json.dumps(json.load(f), sort_keys=True))
    return loss.item()


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")

    # ---- tiny_gqa: Llama, GQA, explicit head_dim, tied, llama3 rope scaling
    head_dim, theta = 16, 10000.0
    rope_scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # 64: high_freq_wavelen = 16, low_freq_wavelen = 64. With theta 1e4 and
        # head_dim 16 the wavelengths are 6.28, 19.9, 62.8, 199, ... so entry 0 is
        # unchanged, entries 1-2 are smoothed and entries 3-7 are divided by 8.
        "original_max_position_embeddings": 64,
    }
    inv_gqa, bands = llama3_inv_freq64(theta, head_dim, rope_scaling)
    for b in ("high(unchanged)", "medium(smoothed)", "low(scaled)"):
        idx = [i for i, x in enumerate(bands) if x == b]
        print(f"tiny_gqa rope band {b}: inv_freq indices {idx}")
        assert idx, f"rope band {b} is empty"
    gqa_cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=128,
        initializer_range=0.15,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": theta, **rope_scaling},
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
        dtype="float32",
    )
    assert gqa_cfg.head_dim != gqa_cfg.hidden_size // gqa_cfg.num_attention_heads
    loss_gqa = build_and_write("tiny_gqa", LlamaForCausalLM, gqa_cfg, 1234, inv_gqa, bands)

    # ---- tiny_bias: Qwen2, qkv bias, untied, GQA, default rope, no sliding window
    bias_theta = 1000000.0
    bias_cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        initializer_range=0.15,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": bias_theta},
        use_sliding_window=False,
        attn_implementation="eager",
        dtype="float32",
    )
    assert bias_cfg.sliding_window is None
    assert all(t == "full_attention" for t in bias_cfg.layer_types)
    bias_head_dim = bias_cfg.hidden_size // bias_cfg.num_attention_heads
    inv_bias = base_inv_freq64(bias_theta, bias_head_dim)
    loss_bias = build_and_write("tiny_bias", Qwen2ForCausalLM, bias_cfg, 5678, inv_bias)

    print(f"\nlosses: tiny_gqa {loss_gqa!r}, tiny_bias {loss_bias!r}")


if __name__ == "__main__":
    main()
