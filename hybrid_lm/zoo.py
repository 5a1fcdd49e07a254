"""The zoo: every model YAML under `model_configs/`, with its size, layer pattern and forward FLOPs per token.

Models are built on the meta device, so listing even the 1B config allocates nothing.
"""

from __future__ import annotations

from pathlib import Path

from .config import load_config
from .model import build_model
from .registry import get_mixer, mixer_names

CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


def find_config(name_or_path: str) -> Path:
    """A config by path, or by zoo name (`tiny-hybrid` -> model_configs/tiny-hybrid.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ValueError(f"no model config {name_or_path!r}: pass a YAML path or one of the zoo names: {names}")


def compact_pattern(layer_types: list[str]) -> str:
    """`[g, g, g, a] * 3` style summary of a layer list (the shortest repeating unit)."""
    n = len(layer_types)
    for size in range(1, n + 1):
        if n % size == 0 and layer_types[:size] * (n // size) == layer_types:
            unit = ", ".join(layer_types[:size])
            return f"[{unit}] x {n // size}" if n // size > 1 else f"[{unit}]"
    raise AssertionError("unreachable")


def zoo_rows(context_len: int, config_dir: Path = CONFIG_DIR) -> list[dict]:
    rows = []
    for path in sorted(config_dir.glob("*.yaml")):
        cfg = load_config(path)
        model = build_model(cfg, device="meta")
        rows.append({
            "name": path.stem,
            "params_m": model.num_parameters() / 1e6,
            "non_embedding_m": model.num_parameters(exclude_embeddings=True) / 1e6,
            "layers": cfg.num_hidden_layers,
            "pattern": compact_pattern(cfg.layer_types),
            "gflops_per_token": model.flops_per_token(context_len) / 1e9,
        })
    return rows


def format_zoo(rows: list[dict], context_len: int) -> str:
    head = f"{'config':<16} {'params':>9} {'non-emb':>9} {'GFLOP/tok@' + str(context_len):>16}  pattern"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<16} {r['params_m']:>8.1f}M {r['non_embedding_m']:>8.1f}M "
                     f"{r['gflops_per_token']:>16.3f}  {r['pattern']}")
    return "\n".join(lines + [""] + mixer_lines())


def mixer_lines() -> list[str]:
    """The registered mixers a pattern may use, grouped by what building them needs."""
    groups: dict[str | None, list[str]] = {}
    for name in mixer_names():
        groups.setdefault(get_mixer(name).requires, []).append(name)
    return [f"mixers{'' if needs is None else ' (need ' + needs + ')'}: {', '.join(names)}"
            for needs, names in sorted(groups.items(), key=lambda kv: kv[0] is not None)]
