"""Every Triton kernel (DSA, rotary, RMSNorm) compiled for an H100 (sm_90) on a machine without a GPU.

The interpreter cases (triton_interpreter_cases.py) check what the kernels compute; they cannot see compiler
failures. Two such failures cost a GPU run on 2026-12-06: a `tl.dot` under a runtime `if` hit a layout assertion
in ConvertTritonGPUToLLVM, and a head-dim split produced a 28-key block (tl.arange needs a power of 2). Both happen
at compile time, which needs no GPU: triton builds the PTX and cubin for a named target.

How: `JITFunction.run` is replaced by a recorder that, instead of launching, binds the launch's arguments, turns
tensors into pointer types (bf16 where the GPU path uses bf16) and scalars into i32 / i64 / fp32, specialises them
as the JIT does on a GPU (alignment and divisibility by 16, which decide vector widths; integers equal to 1 become
constants; without this the PTX differs from the GPU's: scalar atomics where the GPU gets .v4), and compiles
through `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` with the launch's num_warps / num_stages.
The op wrappers run on CPU tensors as on a GPU, so each kernel is compiled with the shapes, constexprs and configs
a real call would use. Outputs are never written (buffers keep whatever torch.empty gave), so nothing is checked
but compilation. Usage: python triton_compile_cases.py [topk|sparse|kl|rotary|norm]... (prints one line per
compiled variant; with PTXAS_USAGE=1 also its registers and spill bytes from `ptxas -v`).
"""

from __future__ import annotations

import inspect
import os
import sys
from unittest import mock

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, native_specialize_impl

TARGET = GPUTarget("cuda", 90, 32)  # H100


def ptxas_usage(ptx: str) -> str:
    """Registers per thread and spill bytes from `ptxas -v` on the kernel's PTX ('' if ptxas is not at hand)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"\.target\s+(sm_\w+)", ptx)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        try:
            out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", arch.group(1) if arch else "sm_90a",
                                  f.name, "-o", os.devnull], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return ""
    info = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes spill stores"
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
COMPILED: dict = {}


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {type(value).__name__}")


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = {p.name: v for p, v in zip(self.params, args)}
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(self.params):
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{self.fn.__name__}: no value for {p.name}")
            bound[p.name] = p.default
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        # the launch's specialisation, as the JIT makes it: 16-byte-aligned pointers and integers divisible by 16
        # are marked so (the compiler then vectorises loads, stores and atomics), an integer 1 becomes a constant
        kind, desc = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", value
        else:
            signature[p.name] = _type_of(value)
            if desc and BaseBackend.parse_attr(desc):
                attrs[(i,)] = BaseBackend.parse_attr(desc)
    key = (self.fn.__module__, self.fn.__name__, tuple(signature.items()), tuple(map(repr, constexprs.items())),
           tuple(sorted(attrs)), tuple(sorted(options.items())))
    if key not in COMPILED:
        kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=TARGET, options=options)
        COMPILED[key] = kernel
        shown = {k: v for k, v in constexprs.items() if k.isupper() and not isinstance(v, str) or k == "PRECISION"}
        usage = ptxas_usage(kernel.asm["ptx"]) if os.environ.get("PTXAS_USAGE") else ""
        print(f"compiled {self.fn.__name__} {shown} {options}: {len(kernel.asm['cubin'])} bytes of sm_90 cubin, "
              f"{kernel.metadata.shared} bytes of shared memory {usage}", flush=True)
    return None


JITFunction.run = _compile_instead_of_launch


def case_topk():
    from hybrid_lm.ops.triton import indexer_topk as it

    bf16 = torch.bfloat16
    for T, topk, dtype in ((4096, 2048, bf16), (20000, 2048, bf16), (3000, 256, torch.float32)):
        q, k, w = torch.randn(1, T, 4, 64).to(dtype), torch.randn(1, T, 64).to(dtype), torch.randn(1, T, 4)
        for select in ("threshold", "torch", "radix", "radix11"):
            if select == "threshold" and T < 8 * topk and topk == 2048:
                continue
            it.indexer_topk_triton(q[:, -512:], k, w[:, -512:], topk, select=select)
    T = 4096
    q, k, w = torch.randn(1, T, 4, 64).to(bf16), torch.randn(1, T, 64).to(bf16), torch.randn(1, T, 4)
    for topk in (256, 2048):
        for kth in ("torch", "search"):
            bufs = it.threshold_buffers(64, T, topk, "cpu")
            cand = it.keep_candidates(q, k, w, torch.zeros(1, 64), *it._visible_range(T, T, None, "cpu"),
                                      0, 64, topk, bufs)
            it.select_candidates(*cand[:3], 0, torch.empty(1, T, topk, dtype=torch.int64), topk, kth=kth)
        for mode in (False, True):  # the default "grouped" ran above
            it.keep_candidates(q, k, w, torch.zeros(1, 64), *it._visible_range(T, T, None, "cpu"), 0, 64, topk,
                               bufs, rank_ties=mode)


def case_sparse():
    from hybrid_lm.ops.triton import sparse_attention as sa

    bf16 = torch.bfloat16
    # (HQ, HKV, D, DV, values a view of the keys): the layer benchmark's MQA/GQA, the 350M hybrid's 16 x 64 MQA,
    # MLA's latents, odd dims
    for HQ, HKV, D, DV, shared in ((16, 1, 128, 128, False), (16, 4, 128, 128, False), (16, 4, 64, 64, False),
                                   (16, 1, 64, 64, False),
                                   (12, 1, 288, 256, True), (16, 1, 576, 512, True), (6, 2, 96, 64, False),
                                   (12, 1, 288, 256, False)):
        T, K = 64, 32
        q = torch.randn(1, T, HQ, D, dtype=bf16)
        k = torch.randn(1, T, HKV, D, dtype=bf16, requires_grad=True)
        v = k[..., :DV] if shared else torch.randn(1, T, HKV, DV, dtype=bf16)
        idx = torch.randint(0, T, (1, T, K), dtype=torch.int32)
        for split in (True, False):
            sa.SPLIT_HEAD_DIM = split
            o, lse = sa.sparse_attention_fwd(q, k, v, idx, None, D ** -0.5)
            sa.sparse_attention_bwd(q, k, v, idx, None, o, lse, torch.randn_like(o), None, D ** -0.5)
        sa.SPLIT_HEAD_DIM = True
        doc = torch.zeros(T, dtype=torch.int32)
        sa.sparse_attention_fwd(q, k, v, idx, doc, D ** -0.5)  # packed documents


def case_kl():
    from hybrid_lm.ops.triton import indexer_kl as kl

    bf16 = torch.bfloat16
    for HQ, HKV, D in ((16, 1, 128), (16, 4, 64), (12, 1, 288)):
        T, K = 256, 64
        q, k = torch.randn(1, T, HQ, D, dtype=bf16), torch.randn(1, T, HKV, D, dtype=bf16)
        qi = torch.randn(1, T, 4, 64, dtype=bf16, requires_grad=True)
        ki = torch.randn(1, T, 64, dtype=bf16, requires_grad=True)
        wi = torch.randn(1, T, 4, requires_grad=True)
        idx = torch.randint(0, T, (1, T, K))
        for name in ("sparse", "dense"):
            fn = getattr(kl, f"indexer_kl_{name}_triton")
            if name == "sparse":
                for one_sweep in (False, True):  # two sweeps (loss, then gradients) or logits + one sweep
                    with mock.patch.object(kl, "SPARSE_ONE_SWEEP", one_sweep):
                        loss = fn(q, k, qi, ki, wi, idx, scale=D ** -0.5, attn_lse=torch.randn(1, T, HQ))
                        torch.autograd.grad(loss, [qi, ki, wi], allow_unused=True)
                continue
            else:
                loss = fn(q, k, qi, ki, wi, scale=D ** -0.5)
            torch.autograd.grad(loss, [qi, ki, wi], allow_unused=True)


def case_rotary():
    from hybrid_lm.ops.triton.rotary import rotary_launch

    for dtype in (torch.bfloat16, torch.float32):
        for D, R in ((128, 128), (64, 64), (64, 32), (96, 64), (256, 64)):  # MLA's rope part, Qwen3-Next's quarter
            x = torch.randn(1, 8, 4, D, dtype=dtype)
            cos = sin = torch.randn(1, 8, R)
            rotary_launch(x, cos, sin)
            rotary_launch(x, cos, sin, backward=True)


def case_norm():
    from hybrid_lm.ops.triton.norm import rms_norm_backward, rms_norm_forward

    for x_dtype, out_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                               (torch.float32, torch.float32)):
        for D in (64, 96, 768, 1024, 2048, 7168):  # q/k heads, MLA's 96, the zoo's hidden sizes, V3's 7168
            x, w = torch.randn(300, D, dtype=x_dtype), torch.ones(D)
            _, rstd = rms_norm_forward(x, w, 1e-6, out_dtype)
            rms_norm_backward(x, w, torch.randn(300, D, dtype=out_dtype), rstd)


CASES = {"topk": case_topk, "sparse": case_sparse, "kl": case_kl, "rotary": case_rotary, "norm": case_norm}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        CASES[name]()
    print(f"ok: {len(COMPILED)} kernel variants compiled for sm_90")
