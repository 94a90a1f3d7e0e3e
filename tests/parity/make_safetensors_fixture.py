#!/usr/bin/env python3
"""Write tests/fixtures/safetensors/reference_small.safetensors with the reference
writer (safetensors.numpy.save_file), for the interoperability check in
tests/unit/test_safetensors.c.

Run by hand:  python3 tests/parity/make_safetensors_fixture.py   (needs safetensors, numpy)

Every value follows a formula over the flat element index i, stated here, in the
file's metadata ("formula") and in the C test:

  f32.matrix  F32  [3, 5]  (i - 7) * 0.25
  f16.vector  F16  [6]     (i - 2) * 0.5
  f64.pair    F64  [2]     i + 0.125
  i64.ids     I64  [4]     i * 1000 - 1
  u8.bytes    U8   [3]     i + 1
  scalar      F32  []      42.5
  empty       F32  [0, 3]  (no elements)

All of them are exact in their dtype. The reference writer lays the data out by
descending dtype alignment, then by name, so the data order differs from the name
order that moontune's writer uses.
"""

import os

import numpy as np
import safetensors
from safetensors.numpy import save_file

FORMULA = ("f32.matrix[3,5]=(i-7)*0.25; f16.vector[6]=(i-2)*0.5; f64.pair[2]=i+0.125; "
           "i64.ids[4]=i*1000-1; u8.bytes[3]=i+1; scalar[]=42.5; empty[0,3]")


def main():
    tensors = {
        "f32.matrix": ((np.arange(15) - 7) * 0.25).astype(np.float32).reshape(3, 5),
        "f16.vector": ((np.arange(6) - 2) * 0.5).astype(np.float16),
        "f64.pair": (np.arange(2) + 0.125).astype(np.float64),
        "i64.ids": (np.arange(4) * 1000 - 1).astype(np.int64),
        "u8.bytes": (np.arange(3) + 1).astype(np.uint8),
        "scalar": np.array(42.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    metadata = {
        "formula": FORMULA,
        "writer": "safetensors.numpy.save_file " + safetensors.__version__,
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = os.path.join(root, "tests", "fixtures", "safetensors", "reference_small.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    print(out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
