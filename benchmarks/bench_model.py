"""Question: how fast does each zoo model train end to end on one GPU, in tokens/s and MFU, at 4k, 16k and 32k?

One training step, as the trainer runs it: forward + LM loss (+ the DSA indexer's KL in the `sparse` stage) +
backward + a fused AdamW step, fp32 weights under bf16 autocast, `B = max(1, --tokens // T)` rows of T tokens
(4 rows at 4k, one row at 16k and 32k by default). Per row: the median of `--steps` timed steps after `--warmup`
steps (which also pay Triton's compile and autotune), forward alone (no grad) the same way, and the peak memory of
the step, optimizer state included. The LM loss is the chunked LM head + cross-entropy the trainer uses
(`return_logits=False`: no [B, T, V] logits; rows say `lm_loss: chunked`; rows without that field, runs up
to 11 on 2026-12-06, held the full logits and their fp32 copies).

Model FLOPs per token (forward; `HybridLM.flops_per_token(T)`, the FLOPs `hybrid-lm zoo` lists):
    2 * (every matmul weight: all parameters but the input embedding; a tied LM head still counts; MoE counts
         only the experts a token uses)
  + attention layer:  2 * (T/2) * H * (d_qk + d_v)          QK^T and PV over the average causal context T/2
  + DSA layer:        2 * min(topk, T/2) * H * (d_qk + d_v)  attention over the selected keys only
                      + 2 * (T/2) * H_idx * d_idx            its lightning indexer scores every causal key
  + Gated DeltaNet:   H_v * (6 d_k d_v + 2 * 64 * (d_k + d_v))   state update/readout + chunk-64 intra-block terms
Training FLOPs = 3 x forward (backward = 2 x forward): 6 x matmul parameters + 3 x the mixer terms. For a dense
attention layer with d_qk = d_v = d_head and H * d_head = d that is 3 * 2 * (T/2) * 2 * d = 6 T d per token,
i.e. PaLM's 12 T d per layer halved for causality. Not counted (they lower MFU, as they should): the indexer's KL
loss and recall metric, norms, activations, softmax, rotary embeddings, the loss and the optimizer step.
    tflops = B * T * training FLOPs per token / step time;  mfu = tflops / the card's peak dense bf16 TFLOPS
(H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989, A100 312, B200 2250; `--peak-tflops` for other cards).

    python benchmarks/bench_model.py --out $OUT/model.json                      # every default config, ~6 min
    python benchmarks/bench_model.py --configs gdn-dsa-350m dense-350m --T 4096 16384 --out model.json
    python benchmarks/bench_model.py --device cpu --tiny --out /tmp/model.json  # seconds: the CPU smoke test
    python benchmarks/bench_model.py --configs dsa-125m --T 4096 --profile 15   # where a step's GPU time goes
    python benchmarks/bench_model.py --configs gdn-dsa-350m --T 32768 --set num_key_value_heads=1  # what-ifs

`--profile N` runs one more step under torch.profiler and keeps the N kernels with the most self device time
(`profile` in the row: name, ms, share of the step's kernel time). `--compile` wraps the model in torch.compile
(`compile: true` in a training config does the same); its compile time falls into the warm-up steps.
`--activation-checkpointing` recomputes each block's activations in the backward, as `activation_checkpointing:
true` in a training config does (rows end in `-ckpt`); `--activation-checkpointing N` only the first N blocks'
(`activation_checkpointing: N`; rows end in `-ckptN`). `--cast-per-projection` times the blocks as they were before
the fifth session of 2026-12-06: under autocast each projection cast the fp32 normalised input itself (rows end in
`-cast-per-projection`); now each block's norms cast it once. `--residual-dtype bf16` keeps the residual stream
in bf16 under autocast, as `residual_dtype: bf16` in a training config does (rows end in `-residual-bf16`).
Rotary embeddings go through the Triton kernel (ops.rotary's "auto" on CUDA); `--rotary-reference` routes them
through the fp32 PyTorch reference instead (the default before 2026-12-06 run 11; rows then end in
`-rotary-reference`, and rows of runs 10-11 ending in `-rotary-kernel` used the kernel when it was opt-in).
RMSNorm goes through torch's F.rms_norm; `--rms-norm-kernel` routes it through the Triton kernel that writes the
matmul dtype directly (rows end in `-rms-norm-kernel`).

A row that fails (out of memory, a missing kernel) is recorded with its error in `note` and the run goes on; rows
left when the `--budget-s` wall-clock budget is spent are recorded as skipped. The JSON is rewritten after every
row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, row, today  # noqa: E402

import hybrid_lm  # noqa: E402
import hybrid_lm.model.block as block  # noqa: E402
from hybrid_lm.zoo import find_config  # noqa: E402

DEFAULT_CONFIGS = ["dense-125m", "gdn-125m", "gdn-attn-125m", "gdn-dsa-125m", "dsa-125m", "qwen3-next-125m",
                   "deepseek-v32-125m", "dense-350m", "gdn-dsa-350m", "gdn-dsa-1b"]
TINY_CONFIGS = ["tiny-hybrid"]
# peak dense bf16 TFLOPS (no sparsity), matched in order against torch.cuda.get_device_name()
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0),
               ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0)]
COLS = ("op", "impl", "T", "B", "fwd_ms", "fwdbwd_ms", "tokens_per_s", "tflops", "mfu", "peak_mem_gb", "note")


def _ckpt_suffix(on) -> str:
    """Row suffix for --activation-checkpointing: every block (True), or the first N blocks."""
    return "-ckpt" if on is True else f"-ckpt{on}"


def peak_tflops_of(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup: int, steps: int) -> float:
    """Median wall milliseconds of fn() over `steps` calls, after `warmup` calls, synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def profile_step(step, device, top: int) -> list:
    """[(kernel name, self ms, share of all kernel time)] of one step: the `top` kernels by self device time (self
    CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr) / 1e3) for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(ms for _, ms in events) or 1.0
    events.sort(key=lambda e: -e[1])
    return [(k[:120], round(ms, 3), round(ms / total, 4)) for k, ms in events[:top]]


def measure(name: str, T: int, args, device, peak: float | None) -> dict:
    cfg = hybrid_lm.load_config(find_config(name))
    if args.set:  # model config overrides: top-level keys, or mixers.<type>.<key>
        cfg = hybrid_lm.config_replace(cfg, **model_overrides(args.set))
    if T > cfg.max_position_embeddings:
        raise ValueError(f"T = {T} exceeds {name}'s max_position_embeddings = {cfg.max_position_embeddings}")
    B = max(1, args.tokens // T)
    torch.manual_seed(0)
    model = hybrid_lm.build_model(cfg, device=device)
    has_dsa = any(cfg.mixer_type(t) == "dsa" for t in cfg.layer_types)
    stage = args.dsa_stage if has_dsa else "none"
    model.set_dsa_stage(stage)
    model.set_activation_checkpointing(args.activation_checkpointing)
    model.set_residual_dtype(torch.bfloat16 if args.residual_dtype == "bf16" else None)
    run = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda" or None)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with autocast(device):
            out = run(ids, labels=ids, collect_metrics=False, return_logits=False)  # no dense recall diagnostic
        loss = out.loss.float() + (out.aux_loss.float() if stage == "sparse" else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), autocast(device):
            run(ids, labels=ids, collect_metrics=False, return_logits=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = median_ms(step, device, args.warmup, args.steps)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    fwd_ms = median_ms(forward, device, 1, max(1, args.steps // 2))
    train_flops_per_token = 3.0 * model.flops_per_token(T)
    tokens_per_s = B * T / (step_ms / 1e3)
    tflops = tokens_per_s * train_flops_per_token / 1e12
    prof = profile_step(step, device, args.profile) if args.profile else None
    if prof:
        print(f"{name} T={T}: top kernels of one step (ms, share of kernel time)")
        for k, ms, share in prof:
            print(f"  {ms:9.3f} {100 * share:5.1f}%  {k}")
    flags = (("-compiled", args.compile), ("-rotary-reference", args.rotary_reference),
             ("-rms-norm-kernel", args.rms_norm_kernel),
             (_ckpt_suffix(args.activation_checkpointing), bool(args.activation_checkpointing)),
             ("-cast-per-projection", args.cast_per_projection), ("-residual-bf16", args.residual_dtype == "bf16"))
    impl = f"train-bf16-{stage}" + "".join(f"-{item}" for item in args.set) + "".join(n for n, on in flags if on)
    return row(name, impl, T, fwd_ms=fwd_ms, fwdbwd_ms=step_ms, tflops=tflops, peak_mem_gb=mem,
               B=B, tokens_per_s=tokens_per_s, mfu=None if peak is None else tflops / peak, peak_tflops=peak,
               params_m=model.num_parameters() / 1e6,
               non_embedding_m=model.num_parameters(exclude_embeddings=True) / 1e6,
               train_gflops_per_token=train_flops_per_token / 1e9, dsa_stage=stage, profile=prof,
               lm_loss="chunked", activation_checkpointing=args.activation_checkpointing, overrides=args.set or None,
               residual_dtype=args.residual_dtype)


def model_overrides(items: list[str]) -> dict:
    """`--set` strings (`num_key_value_heads=1`, `mixers.dsa.index_topk=1024`; values parsed as YAML) as
    config_replace's keyword arguments."""
    from hybrid_lm.training.config import _parse_override

    out: dict = {}
    for item in items:
        keys, value = _parse_override(item)
        if keys[0] == "mixers" and len(keys) == 3:
            out.setdefault("mixers", {}).setdefault(keys[1], {})[keys[2]] = value
        elif len(keys) == 1:
            out[keys[0]] = value
        else:
            raise ValueError(f"--set {item!r}: use a top-level model key or mixers.<type>.<key>")
    return out


def failed(name: str, T: int, e: BaseException) -> dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    return row(name, "oom" if oom else "error", T, note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def save(rows: list, path: str, device) -> None:
    from hybrid_lm.ops.backends import has_fla, has_flash_attn

    meta = dict(card=device_name(device), date=today(), torch=torch.__version__, fla=has_fla(),
                flash_attn=has_flash_attn())  # which kernels the "auto" backends could take
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([dict(r, **meta) for r in rows], f, indent=1)


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", help=f"zoo names or YAML paths (default: {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--T", type=int, nargs="+", help="context lengths (default: 4096 16384 32768)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step: B = max(1, tokens // T) rows")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, autotune)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (median); forward alone runs half as many")
    ap.add_argument("--dsa-stage", default="sparse", choices=["sparse", "none"],
                    help="DSA models: 'sparse' trains with the indexer KL as the trainer does; 'none' LM loss only")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting rows after this many seconds")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile one more step and keep its N costliest kernels (0: off)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in warm-up)")
    ap.add_argument("--activation-checkpointing", nargs="?", const=True, default=False, type=int, metavar="N",
                    help="recompute each block's activations in the backward (rows end in -ckpt), or only the first "
                         "N blocks' (-ckptN)")
    ap.add_argument("--rms-norm-kernel", action="store_true",
                    help="RMSNorm through the Triton kernel (default: torch's F.rms_norm)")
    ap.add_argument("--rotary-reference", action="store_true",
                    help="rotary embeddings through the fp32 PyTorch reference (default: the Triton kernel on CUDA)")
    ap.add_argument("--residual-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the residual stream under autocast (bf16: as `residual_dtype: bf16` trains; rows end in "
                         "-residual-bf16)")
    ap.add_argument("--cast-per-projection", action="store_true",
                    help="each projection casts the blocks' fp32 normalised input itself, as before 2026-12-06 "
                         "(default: the norms cast it once; rows end in -cast-per-projection)")
    ap.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                    help="override a model config value for every row (YAML-parsed; rows' impl name it), e.g. "
                         "--set num_key_value_heads=1 --set mixers.dsa.index_topk=1024")
    ap.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOPS (default: from its name)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help=f"smoke mode: {' '.join(TINY_CONFIGS)} at T 32 64, "
                                                        f"64 tokens a step, one warm-up and one timed step")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "model.json"),
                    help="the JSON file to write (default: $OUT/model.json)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.configs = args.configs or TINY_CONFIGS
        args.T = args.T or [32, 64]
        args.tokens, args.warmup, args.steps = min(args.tokens, 64), 1, 1
    configs, contexts = args.configs or DEFAULT_CONFIGS, args.T or [4096, 16384, 32768]
    device = torch.device(args.device)
    if args.rotary_reference:
        from hybrid_lm.ops.triton import prefer_rotary_kernel

        prefer_rotary_kernel(False)
    if args.rms_norm_kernel:
        from hybrid_lm.ops.triton import prefer_rms_norm_kernel

        prefer_rms_norm_kernel(True)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --device cpu --tiny for the smoke test")
    if args.residual_dtype == "bf16" and device.type != "cuda":
        raise SystemExit("--residual-dtype bf16 keeps the residual stream in bf16 under autocast, which this "
                         f"benchmark turns on only on CUDA, not on {device.type}")
    peak = peak_tflops_of(device, args.peak_tflops)
    print(f"{device_name(device)}; peak bf16 {peak} TFLOPS; torch {torch.__version__}", flush=True)
    if peak is None:
        print("unknown peak TFLOPS for this device: mfu stays empty (pass --peak-tflops)", flush=True)
    # --cast-per-projection: the blocks before 2026-12-06 (fifth session), whose norms return the residual's dtype
    with (mock.patch.object(block, "matmul_dtype", lambda x: x.dtype) if args.cast_per_projection
          else contextlib.nullcontext()):
        return run_rows(configs, contexts, args, device, peak)


def run_rows(configs, contexts, args, device, peak) -> list:
    start, rows = time.perf_counter(), []
    for T in contexts:  # every config at the short context first, so a spent budget cuts the longest rows
        for name in configs:
            if time.perf_counter() - start > args.budget_s:
                rows.append(row(name, "skipped", T, note=f"over the --budget-s {args.budget_s:.0f} s budget"))
                continue
            try:
                rows.append(measure(name, T, args, device, peak))
            except Exception as e:  # keep the other rows of the run
                traceback.print_exc()
                rows.append(failed(name, T, e))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print({k: rows[-1].get(k) for k in COLS}, flush=True)
            save(rows, args.out, device)
    save(rows, args.out, device)
    print_table(rows, cols=COLS)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
