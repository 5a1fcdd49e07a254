"""Export to transformers and back: the exported folder, loaded by transformers in a process that cannot import
hybrid_lm, must reproduce the native model (fp32 logits, greedy generation, loss, hidden states), decode with a
real cache, load when sharded, serve `pipeline("text-generation")`, and import back bit-exactly."""

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hybrid_lm
from hybrid_lm.cli import main as cli_main
from hybrid_lm.config import config_replace
from hybrid_lm.hf import export_hf, import_hf
from hybrid_lm.utils.files import write_manifest
from hybrid_lm.zoo import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
HF_SIDE = Path(__file__).with_name("hf_side.py")
T, NEW = 12, 6  # prompt length (> index_topk, so DSA selects), tokens generated
TINY = dict(
    vocab_size=300, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
    max_position_embeddings=128,
    mixers={"dsa": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 4},
            "gated_deltanet": {"num_heads": 2, "num_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8},
            "attention": {"qk_norm": True, "output_gate": True},
            "local": {"type": "attention", "sliding_window": 5}},
)
# what a mixer must cache at least, whatever its variant (MLA caches a latent instead of k/v)
STATE_KEYS = {"dsa": ["k_idx"],
              "gated_deltanet": ["k_conv1d", "q_conv1d", "state", "v_conv1d"]}
MIXED = ["gated_deltanet", "dsa", "local", "attention"]


def tiny(layer_types, **overrides):
    data = {**TINY, **overrides, "layer_types": list(layer_types), "num_hidden_layers": len(layer_types)}
    return hybrid_lm.build_model(hybrid_lm.config_from_dict(data, "<test>")).eval()


@functools.cache
def small_zoo_configs(max_params: float = 10e6) -> dict:
    """Every zoo config small enough for a CPU test, with DSA selection made active on short prompts."""
    configs = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        config = hybrid_lm.load_config(path)
        if hybrid_lm.build_model(config, device="meta").num_parameters() > max_params:
            continue
        dsa = {name: {"index_topk": 4} for name in config.mixers if config.mixer_type(name) == "dsa"}
        configs[path.stem] = config_replace(config, mixers=dsa) if dsa else config
    return configs


def save_checkpoint(model, run_dir: Path, tokenizer_texts=None) -> Path:
    """A run folder laid out as the trainer writes it: RUN/checkpoints/step_XXXXXXXX/ with a manifest."""
    ckpt = run_dir / "checkpoints" / "step_00000010"
    hybrid_lm.save_model(model, ckpt)
    if tokenizer_texts is not None:
        from hybrid_lm.data import train_bpe_tokenizer

        train_bpe_tokenizer(tokenizer_texts, model.config.vocab_size, ckpt)
    write_manifest(ckpt)
    return ckpt


def exportable_mixers() -> list[str]:
    """Registered mixers that build anywhere (fla_* wrappers need fla and a GPU, and are not exported)."""
    return [name for name in hybrid_lm.mixer_names() if hybrid_lm.get_mixer(name).requires is None]


def build_cases(tmp: Path) -> tuple[list[dict], dict]:
    """Export one model per case; return the job for hf_side.py and the native models to compare with."""
    torch.manual_seed(0)
    specs = {name: dict(model=tiny([name, name])) for name in exportable_mixers()}
    specs["mixed_sharded"] = dict(model=tiny(MIXED, tie_word_embeddings=True), max_shard_size="16KB")
    specs["mixed_bf16"] = dict(model=tiny(MIXED), dtype="bfloat16")
    for name, config in small_zoo_configs().items():
        specs[f"zoo_{name}"] = dict(model=hybrid_lm.build_model(config).eval())
    texts = ["ROMEO: But soft, what light through yonder window breaks?\n"] * 20 + ["JULIET: Ay me!\n"] * 20
    specs["with_tokenizer"] = dict(model=tiny(["gated_deltanet", "dsa"], tie_word_embeddings=True), texts=texts)
    cases = []
    for name, spec in specs.items():
        run = tmp / f"run_{name}"
        save_checkpoint(spec["model"], run, spec.get("texts"))
        out = tmp / f"hf_{name}"  # distinct folder names: transformers caches remote code per folder name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no tokenizer.json")
            export_hf(run, out, max_shard_size=spec.get("max_shard_size", "5GB"), dtype=spec.get("dtype", "auto"))
        prompt = torch.randint(1, spec["model"].config.vocab_size, (2, T))
        case = dict(name=name, dir=str(out), prompt=prompt.tolist(), max_new_tokens=NEW)
        if "texts" in spec:
            case.update(pipeline=True, text="ROMEO: But soft")
        cases.append(case)
        spec.update(run=run, out=out, prompt=prompt)
    return cases, specs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_export")
    cases, specs = build_cases(tmp)
    job = dict(repo_root=str(ROOT), cases=cases, out=str(tmp / "results.pt"))
    (tmp / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(HF_SIDE), str(tmp / "job.json")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"HF side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return specs, torch.load(tmp / "results.pt", weights_only=False)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp32_cases():
    return [*exportable_mixers(), "mixed_sharded", "with_tokenizer", *(f"zoo_{n}" for n in small_zoo_configs())]


def test_hf_side_ran_without_hybrid_lm(exported):
    _, results = exported
    assert results.pop("_hybrid_lm_loaded") == []
    for name, r in results.items():
        assert r["module"].startswith("transformers_modules.") and r["module"].endswith(".modeling_hybrid_lm")


@pytest.mark.parametrize("name", fp32_cases())
def test_fp32_logits_loss_and_hidden_states_match_native(exported, name):
    specs, results = exported
    model, prompt, r = specs[name]["model"], specs[name]["prompt"], results[name]
    with torch.no_grad():
        ref = model(prompt, labels=prompt, output_hidden_states=True)
    assert r["dtype"] == "torch.float32"
    assert rel_err(r["logits"], ref.logits) < 1e-5
    assert abs(r["loss"].item() - ref.loss.item()) < 1e-5 * ref.loss.item()
    assert len(r["hidden_states"]) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for got, want in zip(r["hidden_states"], ref.hidden_states):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", fp32_cases())
def test_greedy_generation_is_token_identical_and_incremental(exported, name):
    specs, results = exported
    model, prompt, r = specs[name]["model"], specs[name]["prompt"], results[name]
    eos = 0 if specs[name].get("texts") else None  # the trained tokenizer's <|endoftext|>
    native = model.generate(prompt, max_new_tokens=NEW, eos_token_id=eos)
    assert torch.equal(r["generated"], native)
    steps = native.shape[1] - T
    assert r["fed"] == [T] + [1] * (steps - 1), "generate() must feed only the new token after the prefill"
    assert r["cache_type"] == "HybridLMCache" and r["cache_len"] == T + steps - 1
    cache = model.new_cache()  # the states native decoding keeps, layer by layer
    with torch.no_grad():
        model(native[:, :-1], cache=cache)
    assert r["cache_keys"] == [sorted(layer) for layer in cache.layers] and all(r["cache_keys"])
    for layer_type, keys in zip(model.config.layer_types, r["cache_keys"]):
        assert set(STATE_KEYS.get(model.config.mixer_type(layer_type), keys)) <= set(keys)


def test_sharded_export(exported):
    specs, _ = exported
    out = specs["mixed_sharded"]["out"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert "model.lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embedding


def test_bf16_export(exported):
    specs, results = exported
    spec, r = specs["mixed_bf16"], results["mixed_bf16"]
    assert json.loads((spec["out"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert r["dtype"] == "torch.bfloat16"
    native = hybrid_lm.load_model(spec["run"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = native(spec["prompt"]).logits
    assert rel_err(r["logits"], ref) < 1e-2


def test_pipeline_returns_text(exported):
    specs, results = exported
    text = results["with_tokenizer"]["pipeline"]
    assert isinstance(text, str) and text.startswith("ROMEO: But soft") and len(text) > len("ROMEO: But soft")
    out = specs["with_tokenizer"]["out"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 0 and json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


def test_export_folder_layout(exported):
    specs, _ = exported
    out = specs["attention"]["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hybrid_lm" and config["architectures"] == ["HybridLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid_lm.HybridLMForCausalLM"
    assert config["hybrid_layer_types"] == ["attention", "attention"]
    assert config["layer_types"] == ["full_attention", "full_attention"]
    for name in ("configuration_hybrid_lm.py", "modeling_hybrid_lm.py", "generation_config.json",
                 "model.safetensors"):
        assert (out / name).is_file()
    assert "import hybrid_lm" not in (out / "modeling_hybrid_lm.py").read_text()


@pytest.mark.parametrize("name", ["mixed_sharded", "mixed_bf16", "with_tokenizer"])
def test_import_round_trip_is_bit_exact(exported, tmp_path, name):
    spec = exported[0][name]
    dtype = torch.bfloat16 if spec.get("dtype") == "bfloat16" else None
    source = hybrid_lm.load_model(spec["run"], dtype=dtype)
    back = hybrid_lm.load_model(import_hf(spec["out"], tmp_path / "native"))
    want, got = source.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert (back.lm_head.weight is back.embed_tokens.weight) == source.config.tie_word_embeddings
    assert hybrid_lm.config.config_to_dict(back.config) == hybrid_lm.config.config_to_dict(source.config)
    assert (tmp_path / "native" / "tokenizer.json").is_file() == bool(spec.get("texts"))


def test_cli_export_and_import(tmp_path, capsys):
    torch.manual_seed(1)
    model = tiny(["gated_deltanet", "attention"])
    save_checkpoint(model, tmp_path / "run")
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    with pytest.warns(UserWarning, match="no tokenizer.json"):  # again, sharded, over the first export
        assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--max-shard-size", "8KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = hybrid_lm.load_model(tmp_path / "back")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hf2"), "--dtype", "int8"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def test_a_failed_export_leaves_the_earlier_export_whole(tmp_path):
    model = tiny(["gated_deltanet", "attention"])
    ckpt = save_checkpoint(model, tmp_path / "run")
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        export_hf(ckpt, tmp_path / "hf", dtype="float32")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    bad = save_checkpoint(model, tmp_path / "bad")
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        export_hf(bad, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    back = hybrid_lm.load_model(import_hf(tmp_path / "hf", tmp_path / "back"))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    model = tiny(["attention"])
    ckpt = save_checkpoint(model, tmp_path / "run")
    for dtype in ("int8", "float64x"):
        with pytest.raises(ValueError, match="unknown dtype"):
            export_hf(ckpt, tmp_path / "out", dtype=dtype)
    for size in ("lots", "-5GB", "0", "5 parsecs"):
        with pytest.raises(ValueError, match="not a size"):
            export_hf(ckpt, tmp_path / "out", max_shard_size=size)
    with pytest.raises(ValueError, match="source folder"):
        export_hf(ckpt, ckpt)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(ckpt, tmp_path / "busy")
    with pytest.raises(ValueError, match="no config.json"):
        import_hf(tmp_path / "missing", tmp_path / "back")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON"):
        import_hf(tmp_path / "broken", tmp_path / "back")
    with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON"):
        export_hf(ckpt, tmp_path / "broken")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        import_hf(tmp_path / "llama", tmp_path / "back")
