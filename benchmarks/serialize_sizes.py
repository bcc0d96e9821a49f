"""On-disk size of qfx.save files per precision against the fp16 safetensors of the same model.

Random-init BERT-base (size does not depend on values), compiled on the CPU to W4A4 and W8A8,
saved with ``qfx.save`` and reloaded with ``qfx.load`` (outputs compared bit for bit).

    python benchmarks/serialize_sizes.py [--out-dir /tmp/qfx_sizes]     # ~3 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

import qfx
from qfx.runtime import fileformat, serialize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="/tmp/qfx_sizes")
    out = Path(p.parse_args(argv).out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072)).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fp16_path = out / "bert_fp16.safetensors"
    save_file({k: v.detach().half().contiguous().clone() for k, v in model.state_dict().items()}, str(fp16_path))
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    lin_fp16 = sum(2 * (m.weight.numel() + m.bias.numel()) for m in linears)
    print(f"fp16 file {os.path.getsize(fp16_path) / 2**20:.1f} MiB, encoder linears in fp16 {lin_fp16 / 2**20:.1f} MiB")
    for bits in (4, 8):
        qat = qfx.prepare_qat(model, example_kwargs=batch, config=qfx.QuantConfig(bits, bits))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = qfx.compile(qat, mode=f"int{bits}", target="cpu")
        path = out / f"bert_w{bits}a{bits}.safetensors"
        t = time.time()
        qfx.save(cm, path)
        t_save = time.time() - t
        t = time.time()
        again = qfx.load(path)
        t_load = time.time() - t
        same = torch.equal(cm(**batch).last_hidden_state, again(**batch).last_hidden_state)
        r = serialize.size_report(path, fp16_path)
        with open(path, "rb") as f:  # the header: graph + metadata JSON (qfx.load reads at most 32 MiB)
            header = int.from_bytes(f.read(8), "little")
        print(f"W{bits}A{bits}: file {r['file_bytes'] / 2**20:.1f} MiB ({r['file_bytes'] / r['fp16_file_bytes']:.3f}x the fp16 "
              f"file; header {header / 2**10:.0f} KiB of at most {fileformat.MAX_HEADER_BYTES >> 20} MiB), "
              f"encoder linears {r['linear_bytes'] / 2**20:.1f} MiB ({r['linear_bytes'] / lin_fp16:.3f}x fp16), "
              f"save {t_save:.1f} s, load {t_load:.1f} s, reload bit-identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
