"""Peak extra memory of ``token_kd`` (forward + backward) with and without ``chunk_size``, on the CPU.

Measured with torch.profiler's memory tracking (``[memory]`` events, "Total Allocated"):
the peak of bytes allocated during one forward and backward pass, above what was allocated
before it (the student and teacher logits themselves). The student logits' gradient
(tokens x vocab, the logits' dtype) is part of the peak in every variant: autograd hands it
to the model's backward whatever the loss does.

    .venv/bin/python benchmarks/lm_memory.py                 # 32k vocabulary, 1024 tokens
    .venv/bin/python benchmarks/lm_memory.py --tokens 2048 --vocab 32000 --chunks 128 512
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import kdforge
from kdforge import Batch, ModelOutputs, StepOutputs
from kdforge.plugins.lm_losses import DIVERGENCES

MiB = 2**20


def peak_bytes(fn) -> int:
    """Peak of CPU bytes allocated while ``fn()`` runs, above the level when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # "Total Allocated" is the process's level after each event; the level before the first is the baseline
    baseline = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - baseline


def measure(divergence: str, chunk: int | None, tokens: int, vocab: int, dtype: torch.dtype, top_k: int | None = None) -> int:
    """Peak extra bytes of one forward + backward of token_kd."""
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(1, tokens, vocab, generator=g) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(1, tokens, vocab, generator=g) * 2).to(dtype)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    loss = kdforge.create("loss", "token_kd", divergence=divergence, chunk_size=chunk, top_k=top_k)
    batch = Batch(torch.zeros_like(targets), targets, torch.zeros(1, dtype=torch.long))
    out = StepOutputs(student=ModelOutputs(student), teacher=ModelOutputs(teacher), targets=targets, batch=batch)

    def step() -> None:
        loss(out).backward()

    gc.collect()
    step()  # warm-up: one-time allocations (the profiler's own, lazy inits)
    student.grad = None
    return peak_bytes(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunks", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--divergences", nargs="*", default=list(DIVERGENCES))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    grad = {d: args.tokens * args.vocab * torch.finfo(d).bits // 8 for d in (torch.float32, torch.bfloat16)}
    print(f"token_kd peak extra memory, {args.tokens} tokens x {args.vocab} vocabulary "
          f"(the logits' own gradient: {grad[torch.float32] / MiB:.0f} MiB float32, {grad[torch.bfloat16] / MiB:.0f} MiB bf16)")
    print(f"{'divergence':<16} {'logits':<9} {'chunk':>6} {'peak MiB':>9} {'minus grad':>11} {'(rows, vocab) f32 copies':>25}")
    for dtype in (torch.float32, torch.bfloat16):
        for divergence in args.divergences:
            for chunk in [None, *args.chunks]:
                peak = measure(divergence, chunk, args.tokens, args.vocab, dtype)
                rows = args.tokens if chunk is None else chunk
                extra = peak - grad[dtype]
                copies = extra / (rows * args.vocab * 4)
                name = "bf16" if dtype is torch.bfloat16 else "float32"
                print(f"{divergence:<16} {name:<9} {chunk or 'none':>6} {peak / MiB:>9.1f} {extra / MiB:>11.1f} {copies:>25.2f}",
                      flush=True)
    for k in (64,):
        for chunk in (None, args.chunks[0]):
            peak = measure("forward_kl", chunk, args.tokens, args.vocab, torch.float32, top_k=k)
            print(f"forward_kl top_k={k} float32 chunk {chunk or 'none'}: peak {peak / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
