#!/usr/bin/env python3
"""Write tests/fixtures/optim/reference.safetensors: what torch's optimizers and
transformers' learning-rate schedules compute, for tests/unit/test_optim_sched.c.

Run by hand:  python3 tests/parity/make_optim_reference.py   (needs torch, transformers,
safetensors, numpy; CPU only, nothing is downloaded)

Four parameters of different shapes start from fixed values and take 10 steps, each
with its own fixed gradient and learning rate:

  adamw/<p>           torch.optim.AdamW, betas (0.9, 0.95), eps 1e-6, weight_decay 0.1,
                      amsgrad False; layer.bias in its own group with weight_decay 0
  adamw_amsgrad/<p>   the same with amsgrad True
  sgd_nesterov/<p>    torch.optim.SGD, momentum 0.9, dampening 0, nesterov True,
                      weight_decay 1e-2; layer.bias in its own group with weight_decay 0
  sgd_dampening/<p>   torch.optim.SGD, momentum 0.9, dampening 0.5, nesterov False,
                      weight_decay 0 (the first step's buffer is the gradient itself)
  lion_numpy_f64/<p>  Lion (Chen et al. 2023, as lucidrains/lion-pytorch), betas (0.9, 0.99),
                      weight_decay 0.1 (0 for layer.bias): NOT torch, a float64 numpy
                      implementation written in this script (lion_numpy below)

Each holds the parameter after steps 1..10, stacked: shape (10, *param shape).
The schedules are sched/<name>: the learning rate at steps 0..99 of 100 total steps
with 10 warmup steps and base lr 3e-4, read from a real LambdaLR (get_last_lr before
each scheduler step), float64.
"""

import json
import math
import os
import platform
import struct
import sys
import warnings

import numpy as np
import safetensors
import torch
import transformers
from safetensors.numpy import save_file
from transformers import optimization as hf

STEPS = 10
SEED = 20240613
PARAMS = {  # name: (shape, gradient scale)
    "layer.weight": ((4, 6), 1.0),
    "layer.bias": ((6,), 1.0),
    "norm.weight": ((5,), 1e-5),  # tiny gradients: AdamW's eps matters
    "embed.weight": ((3, 2, 5), 1.0),
}
NO_DECAY = "layer.bias"
# Per-step gradient scales: large after small makes AMSGrad's maximum differ from v.
STEP_SCALE = [1.0, 0.5, 2.0, 0.1, 1.5, 0.05, 1.0, 0.3, 3.0, 0.2]
LRS = [1e-2 * (1.0 - 0.07 * k) for k in range(STEPS)]

ADAMW = dict(betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
SGD = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2)
# dampening != 0 tells torch's first-step buffer (a clone of the gradient) from a zero start
SGD_DAMPENING = dict(momentum=0.9, dampening=0.5, nesterov=False, weight_decay=0.0)
LION = dict(beta1=0.9, beta2=0.99, weight_decay=0.1)

TOTAL, WARMUP, BASE_LR = 100, 10, 3e-4


def make_data():
    rng = np.random.default_rng(SEED)
    init, grads = {}, {}
    for name, (shape, scale) in PARAMS.items():
        init[name] = rng.standard_normal(shape).astype(np.float32)
        g = np.stack([rng.standard_normal(shape) * scale * s for s in STEP_SCALE])
        grads[name] = g.astype(np.float32)
    return init, grads


def run_torch(make_opt, init, grads):
    params = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in init.items()}
    decay = [p for n, p in params.items() if n != NO_DECAY]
    groups = [{"params": decay}, {"params": [params[NO_DECAY]], "weight_decay": 0.0}]
    opt = make_opt(groups)
    out = {n: [] for n in params}
    for k in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        for n, p in params.items():
            p.grad = torch.from_numpy(grads[n][k].copy())
        opt.step()
        for n, p in params.items():
            out[n].append(p.detach().numpy().copy())
    return {n: np.stack(v).astype(np.float32) for n, v in out.items()}


def lion_numpy(init, grads):
    """Lion in float64 numpy (the paper's Algorithm, lucidrains' order of operations).
    Also checks that an fp32 computation of the sign argument agrees everywhere, so that
    the fp32 C plugin cannot flip a sign by rounding."""
    out = {}
    for n in init:
        wd = 0.0 if n == NO_DECAY else LION["weight_decay"]
        b1, b2 = LION["beta1"], LION["beta2"]
        p = init[n].astype(np.float64)
        m = np.zeros_like(p)
        m32 = np.zeros(p.shape, np.float32)
        steps = []
        for k in range(STEPS):
            lr = LRS[k]
            g = grads[n][k].astype(np.float64)
            p = p * (1.0 - lr * wd)
            c = b1 * m + (1.0 - b1) * g
            c32 = m32 * np.float32(b1) + np.float32(1.0 - b1) * grads[n][k]
            if not np.array_equal(np.sign(c), np.sign(c32)) or np.any(c == 0):
                sys.exit(f"lion: {n} step {k + 1}: fp32 and fp64 signs differ; change SEED")
            p = p - lr * np.sign(c)
            m = b2 * m + (1.0 - b2) * g
            m32 = m32 * np.float32(b2) + np.float32(1.0 - b2) * grads[n][k]
            steps.append(p.copy())
        out[n] = np.stack(steps)
    return out


def schedules():
    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        sched = make(opt)
        values = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(TOTAL):
                values.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
        return np.array(values, dtype=np.float64)

    W, T = WARMUP, TOTAL
    return {
        "constant": lrs(lambda o: hf.get_constant_schedule_with_warmup(o, W)),
        "linear": lrs(lambda o: hf.get_linear_schedule_with_warmup(o, W, T)),
        "cosine": lrs(lambda o: hf.get_cosine_schedule_with_warmup(o, W, T)),
        "cosine_min_lr": lrs(lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(
            o, W, T, min_lr_rate=0.1)),
        "cosine_cycles": lrs(lambda o: hf.get_cosine_schedule_with_warmup(o, W, T, num_cycles=1.5)),
        "wsd_cosine": lrs(lambda o: hf.get_wsd_schedule(
            o, W, 20, num_training_steps=T, decay_type="cosine", min_lr_ratio=0.1)),
        "wsd_linear": lrs(lambda o: hf.get_wsd_schedule(
            o, W, 20, num_training_steps=T, decay_type="linear", min_lr_ratio=0.1)),
        "wsd_1-sqrt": lrs(lambda o: hf.get_wsd_schedule(
            o, W, 20, num_training_steps=T, decay_type="1-sqrt", min_lr_ratio=0.1)),
        # explicit num_stable_steps: 10 + 50 + 20 = 80 < 100, steps 80..99 stay at the minimum
        "wsd_stable50": lrs(lambda o: hf.get_wsd_schedule(
            o, W, 20, num_stable_steps=50, warmup_type="cosine", decay_type="cosine",
            min_lr_ratio=0.05, num_cycles=0.25)),
    }


def canonicalise_metadata_order(path):
    """safetensors keeps metadata in a hash map, so its key order (and the file bytes)
    changes from run to run: rewrite the header with the keys sorted (same length)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:
            sys.exit(f"{path}: the canonical header is longer than the original")
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    init, grads = make_data()

    adamw = run_torch(lambda g: torch.optim.AdamW(g, lr=LRS[0], amsgrad=False, **ADAMW),
                      init, grads)
    ams = run_torch(lambda g: torch.optim.AdamW(g, lr=LRS[0], amsgrad=True, **ADAMW),
                    init, grads)
    sgd = run_torch(lambda g: torch.optim.SGD(g, lr=LRS[0], **SGD), init, grads)
    sgd_damp = run_torch(lambda g: torch.optim.SGD(g, lr=LRS[0], **SGD_DAMPENING), init, grads)
    lion = lion_numpy(init, grads)
    if all(np.array_equal(adamw[n], ams[n]) for n in init):
        sys.exit("amsgrad made no difference: change STEP_SCALE")

    tensors = {"lr": np.array(LRS, dtype=np.float64)}
    for n in init:
        tensors["init/" + n] = init[n]
        tensors["grad/" + n] = grads[n]
        tensors["adamw/" + n] = adamw[n]
        tensors["adamw_amsgrad/" + n] = ams[n]
        tensors["sgd_nesterov/" + n] = sgd[n]
        tensors["sgd_dampening/" + n] = sgd_damp[n]
        tensors["lion_numpy_f64/" + n] = lion[n]
    for name, values in schedules().items():
        tensors["sched/" + name] = values

    metadata = {
        "generator": "tests/parity/make_optim_reference.py",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "no_decay": NO_DECAY,
        "adamw": json.dumps(ADAMW, sort_keys=True),
        "sgd": json.dumps(SGD, sort_keys=True),
        "sgd_dampening": json.dumps(SGD_DAMPENING, sort_keys=True),
        "lion": json.dumps(dict(LION, implementation="float64 numpy in this script"),
                           sort_keys=True),
        "schedules": json.dumps(dict(total=TOTAL, warmup=WARMUP, base_lr=BASE_LR), sort_keys=True),
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = os.path.join(root, "tests", "fixtures", "optim", "reference.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    canonicalise_metadata_order(out)
    size = os.path.getsize(out)
    if size >= 200_000:
        sys.exit(f"{out}: {size} bytes, over the 200 KB budget")
    print(out, size, "bytes")


if __name__ == "__main__":
    main()
