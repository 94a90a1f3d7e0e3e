#!/usr/bin/env python3
"""References for the lora and qlora adapter plugins.

    pip install torch transformers safetensors peft bitsandbytes    # CPU is enough
    python3 tests/parity/make_lora_reference.py

Writes two files:

tests/fixtures/lora/reference.safetensors
    PEFT LoRA on tests/fixtures/tiny_gqa: r=4, lora_alpha=8 (scaling 2),
    target_modules="all-linear" (every projection but the tied lm_head), dropout 0.
    A and B are set to fixed random values (B non-zero, so that the gradients of A
    are non-trivial). With the batch of tiny_gqa/reference.safetensors it records
    the initial A and B (init.<name>), the logits, the mean masked loss, the
    gradient of every lora_A / lora_B (grad.<name>) and, after merge_and_unload(),
    the merged weights of a few projections (merged.<weight name>). Names are
    PEFT's saved names without the "base_model.model." prefix, e.g.
    model.layers.0.self_attn.q_proj.lora_A.weight, as the plugin registers them.

tests/fixtures/nf4/reference.safetensors
    bitsandbytes' NF4 quantization with double quantization of a fixed (64,128)
    float32 tensor, quantize_4bit(t, blocksize=64, quant_type="nf4",
    compress_statistics=True) on the CPU: packed codes, the 8-bit quantized absmax,
    the offset, state2's absmax and code (the dynamic map), and dequantize_4bit's
    output. See tests/parity/README.md (section "LoRA, QLoRA and NF4") for the one
    place where bitsandbytes' native CPU kernel and its own PyTorch reference differ
    and which one the fixture (and the plugin) follows.
"""
import copy
import math
import os
import struct
import json

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import peft
from peft import LoraConfig, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny_gqa")
LORA_OUT = os.path.join(ROOT, "tests", "fixtures", "lora", "reference.safetensors")
NF4_OUT = os.path.join(ROOT, "tests", "fixtures", "nf4", "reference.safetensors")

R, ALPHA = 4, 8.0
IGNORE = -100
MERGED = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]


def canonicalise_metadata_order(path):
    """Sort the __metadata__ keys so that regenerated files are byte-identical."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def plain_name(peft_name):
    """base_model.model.X.lora_A.default.weight -> X.lora_A.weight"""
    name = peft_name.replace(".default.", ".")
    prefix = "base_model.model."
    assert name.startswith(prefix), peft_name
    return name[len(prefix):]


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------

def lora_model(dtype):
    base = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager", dtype=dtype)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.eval()  # dropout is 0 anyway; eval keeps transformers' own dropouts off
    return model


def set_lora_values(model):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT's kaiming init draws it, B ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(4321)
    init = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                v = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
            elif "lora_B" in name:
                v = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                continue
            p.copy_(v.to(p.dtype))
            init[plain_name(name)] = p.detach().to(torch.float32).clone()
    return init


def run(model, tokens, targets):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    grads = {plain_name(n): p.grad.detach().clone()
             for n, p in model.named_parameters() if "lora_" in n}
    return logits.detach(), loss.detach(), grads


def make_lora():
    print("=== LoRA (PEFT) on tiny_gqa ===")
    ref = load_file(os.path.join(MODEL, "reference.safetensors"))
    tokens, targets = ref["tokens"].long(), ref["targets"].long()

    model = lora_model(torch.float32)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable), trainable
    modules = sorted({n.split(".")[-4] for n in trainable})
    print(f"{len(trainable)} trainable tensors on modules {modules}")
    assert modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"]), modules
    init = set_lora_values(model)
    logits, loss, grads = run(model, tokens, targets)
    print(f"loss {loss.item()!r}")

    # float64 copy: the fp32 reference must be accurate well below the test tolerances
    m64 = lora_model(torch.float64)
    with torch.no_grad():
        for n, p in m64.named_parameters():
            if "lora_" in n:
                p.copy_(init[plain_name(n)].double())
    lg64, l64, g64 = run(m64, tokens, targets)
    worst = max((rel(grads[n], g64[n]), n) for n in grads)
    print(f"fp32 vs fp64: logits norm-rel {rel(logits, lg64):.3e}, loss rel "
          f"{abs(loss.item() - l64.item()) / abs(l64.item()):.3e}, worst lora grad norm-rel "
          f"{worst[0]:.3e} ({worst[1]})")
    assert rel(logits, lg64) < 1e-5 and worst[0] < 1e-4
    for n in grads:
        assert grads[n].abs().max() > 0, f"zero gradient for {n}"

    # merged weights
    merged_model = copy.deepcopy(model).merge_and_unload()
    sd = merged_model.state_dict()
    with torch.no_grad():
        lg_merged = merged_model(input_ids=tokens).logits
    print(f"merged vs unmerged logits: max|d| {(lg_merged - logits).abs().max().item():.3e}")

    out = {"tokens": ref["tokens"], "targets": ref["targets"],
           "logits": logits.float().contiguous(), "loss": loss.reshape(1).float().contiguous()}
    for n, v in init.items():
        out["init." + n] = v.contiguous()
    for n, v in grads.items():
        out["grad." + n] = v.float().contiguous()
    for n in MERGED:
        out["merged." + n] = sd[n].float().contiguous()
    meta = {"generator": "tests/parity/make_lora_reference.py", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "r": str(R), "lora_alpha": repr(ALPHA), "scaling": repr(ALPHA / R),
            "target_modules": "all-linear", "lora_dropout": "0.0", "loss": repr(loss.item())}
    os.makedirs(os.path.dirname(LORA_OUT), exist_ok=True)
    save_file(out, LORA_OUT, metadata=meta)
    canonicalise_metadata_order(LORA_OUT)
    print(f"wrote {LORA_OUT}: {len(init)} A/B tensors, {len(MERGED)} merged weights")


# ---------------------------------------------------------------------------
# NF4 with double quantization
# ---------------------------------------------------------------------------

def nf4_input():
    """(64,128) float32: 128 blocks of 64, with the awkward cases on purpose."""
    import bitsandbytes.functional as bf
    g = torch.Generator().manual_seed(2024)
    code = bf.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2  # bitsandbytes' decision thresholds (fp32)
    blocks = []
    # block 0: all zeros (absmax 0)
    blocks.append(torch.zeros(64))
    # block 1: absmax exactly 1: every code value, every threshold (exact ties), +-1
    b = torch.cat([code, mids, -mids, torch.tensor([1.0, -1.0])])
    blocks.append(torch.cat([b, torch.zeros(64 - b.numel())]))
    # block 2: absmax exactly 2 (power of two: x * (1/absmax) is exact): ties again
    b = torch.cat([2 * mids, 2 * code, torch.tensor([2.0])])
    blocks.append(torch.cat([b, -0.5 * torch.rand(64 - b.numel(), generator=g)]))
    # block 3: the largest magnitude is negative
    b = torch.randn(64, generator=g)
    b[17] = -3.5
    blocks.append(b)
    # block 4: tiny values
    blocks.append(1e-30 * torch.randn(64, generator=g))
    # block 5: the same magnitude at both signs
    b = torch.randn(64, generator=g) * 0.3
    b[3], b[40] = 1.25, -1.25
    blocks.append(b)
    # block 6: one large block, so that state2's absmax comes from it
    blocks.append(40.0 * torch.randn(64, generator=g))
    # the rest: Gaussian with a per-block scale spread over four decades
    while len(blocks) < 128:
        s = 10.0 ** (torch.rand(1, generator=g).item() * 4 - 3)
        blocks.append(s * torch.randn(64, generator=g))
    return torch.cat(blocks).reshape(64, 128).to(torch.float32).contiguous()


def dq8_input():
    """Inputs for the 8-bit stage alone (absmax minus offset, quantized in blocks of 256):
    values near zero and near the dynamic map's thresholds, where bitsandbytes' native
    CPU kernel (a 65536-bin lookup table) and its PyTorch reference (nearest code) differ."""
    import bitsandbytes.functional as bf
    g = torch.Generator().manual_seed(77)
    dmap = bf.create_dynamic_map()
    mids = (dmap[:-1] + dmap[1:]) / 2
    v = torch.cat([dmap, mids,  # absmax 1 in each block: the code values and exact ties
                   1e-6 * torch.randn(200, generator=g), torch.tensor([1.0]),
                   torch.randn(300, generator=g) * 0.01, torch.tensor([-1.0])])
    v = v[:768] if v.numel() >= 768 else torch.cat([v, torch.randn(768 - v.numel(), generator=g)])
    # each block of 256 must contain +-1 so that the ties stay exact after scaling
    v = v.reshape(3, 256)
    v[:, 0] = 1.0
    return v.reshape(-1).to(torch.float32).contiguous()


def make_nf4():
    print("\n=== NF4 (bitsandbytes) ===")
    import bitsandbytes
    import bitsandbytes.functional as bf

    t = nf4_input()
    packed, st = bf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert st.nested and st.blocksize == 64 and st.state2.blocksize == 256
    deq = bf.dequantize_4bit(packed, st)
    print(f"quantize_4bit: packed {tuple(packed.shape)} {packed.dtype}, absmax "
          f"{tuple(st.absmax.shape)} {st.absmax.dtype}, offset {st.offset.item()!r}, "
          f"state2 absmax {st.state2.absmax.tolist()}, code {tuple(st.state2.code.shape)}")
    print(f"max |dequant - input| = {(deq - t).abs().max().item():.4g} "
          f"(max |input| {t.abs().max().item():.4g})")

    # the fp32 absmax and bitsandbytes' own pure-PyTorch reference of the 8-bit stage
    absmax32 = t.reshape(-1, 64).abs().max(1)[0]
    assert torch.equal(absmax32.mean(), st.offset)
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    qb = torch.ops.bitsandbytes.quantize_blockwise.default
    ref_q, ref_a = qb.redispatch(ks, absmax32 - st.offset, st.state2.code, 256)
    native_q, native_a = qb(absmax32 - st.offset, st.state2.code, 256)
    assert torch.equal(ref_a, st.state2.absmax) and torch.equal(native_a, st.state2.absmax)
    assert torch.equal(native_q, st.absmax)
    n_diff = int((ref_q != st.absmax).sum())
    print(f"8-bit absmax codes: native CPU kernel vs PyTorch reference differ in {n_diff} of "
          f"{st.absmax.numel()}")
    assert n_diff == 0, "pick an input where both agree (see dq8_* for where they do not)"

    # bitsandbytes' offset is torch's float32 mean, whose summation order depends on the
    # CPU's vector width and the thread count; the plugin takes the correctly rounded mean.
    # Check that the 8-bit stage gives the same bytes with that offset.
    offset_cr = torch.tensor(absmax32.double().mean().item(), dtype=torch.float32)
    cr_q, cr_a = qb.redispatch(ks, absmax32 - offset_cr, st.state2.code, 256)
    ulps = abs(offset_cr.view(torch.int32).item() - st.offset.view(torch.int32).item())
    print(f"offset: torch {st.offset.item()!r}, correctly rounded {offset_cr.item()!r} "
          f"({ulps} ulp apart)")
    assert ulps <= 1
    assert torch.equal(cr_q, st.absmax) and torch.equal(cr_a, st.state2.absmax)

    # the 8-bit stage alone, on inputs where native and reference differ
    x8 = dq8_input()
    q8_ref, a8 = qb.redispatch(ks, x8, st.state2.code, 256)
    q8_nat, a8n = qb(x8, st.state2.code, 256)
    assert torch.equal(a8, a8n)
    n8 = int((q8_ref != q8_nat).sum())
    print(f"dq8 input ({x8.numel()} values): native vs reference codes differ in {n8}")
    # the reference: code index = number of fp32 midpoints (code[i]+code[i+1])/2 strictly
    # below x * (1/absmax), i.e. the nearest code with ties going to the lower code
    dmap = st.state2.code
    mids8 = (dmap[:-1] + dmap[1:]) / 2
    sc = (x8.reshape(-1, 256) * (1.0 / a8.view(-1, 1))).clamp(-1, 1).reshape(-1)
    count = (mids8.unsqueeze(0) < sc.unsqueeze(1)).sum(1)
    assert torch.equal(count.to(torch.uint8), q8_ref)
    n_ties = int((mids8.unsqueeze(0) == sc.unsqueeze(1)).sum())
    print(f"dq8 input: {n_ties} values fall exactly on a threshold")

    out = {
        "input": t,
        "packed": packed.reshape(-1).contiguous(),
        "absmax_q": st.absmax.contiguous(),
        "absmax_fp32": absmax32.contiguous(),
        "offset": st.offset.reshape(1).to(torch.float32).contiguous(),
        "offset_correctly_rounded": offset_cr.reshape(1).contiguous(),
        "state2_absmax": st.state2.absmax.reshape(-1).contiguous(),
        "code": st.state2.code.contiguous(),
        "nf4_code": st.code.contiguous(),
        "dequant": deq.contiguous(),
        "dq8_input": x8,
        "dq8_absmax": a8.contiguous(),
        "dq8_codes": q8_ref.contiguous(),
        "dq8_codes_native": q8_nat.contiguous(),
    }
    meta = {"generator": "tests/parity/make_lora_reference.py", "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "call": "quantize_4bit(input, blocksize=64, quant_type='nf4', "
                    "compress_statistics=True) on the CPU",
            "source": "bitsandbytes itself (not a re-implementation)",
            "offset": "torch's float32 mean of the absmax (its summation order depends on the "
                      "machine); offset_correctly_rounded is the exactly rounded mean, which "
                      "gives the same absmax_q and state2_absmax here",
            "dq8_codes": "bitsandbytes' pure-PyTorch reference of quantize_blockwise "
                         "(nearest code, ties to the lower), blocksize 256",
            "dq8_codes_native": f"bitsandbytes' native CPU kernel on the same input: "
                                f"{n8} of {x8.numel()} codes differ from dq8_codes"}
    os.makedirs(os.path.dirname(NF4_OUT), exist_ok=True)
    save_file(out, NF4_OUT, metadata=meta)
    canonicalise_metadata_order(NF4_OUT)
    with safe_open(NF4_OUT, "pt") as f:
        assert torch.equal(f.get_tensor("packed"), packed.reshape(-1))
    print(f"wrote {NF4_OUT}")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    make_lora()
    make_nf4()


if __name__ == "__main__":
    main()
