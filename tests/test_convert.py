"""`hybrid-lm convert`: Hugging Face Llama / Qwen2 / Qwen3 and our own dense models -> DSA models.

Invariants: copied tensors are bit-exact; with index_topk >= T the converted model's logits equal the source's
(HF eager attention in fp32); with index_topk < T selection changes exactly the positions that see more than topk
keys; the fresh indexers are the only thing dense_warmup trains. Shapes: `ids [B, T]`, `logits [B, T, V]`.
"""

import json
import shutil

import pytest
import torch

import hybrid_lm
from hybrid_lm.cli import main as cli_main
from hybrid_lm.convert import PROVENANCE_NAME, convert_checkpoint, hf_config_to_ours, parse_dsa_layers
from hybrid_lm.utils.files import MANIFEST_NAME, write_manifest

transformers = pytest.importorskip("transformers")

B, T, V = 2, 12, 128
INDEX = dict(index_n_heads=2, index_head_dim=16)
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"eos_token": "</s>"}',
             "special_tokens_map.json": '{"eos_token": "</s>"}'}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24}),
}


def _hf_model(family, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    kw = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=V, max_position_embeddings=64, rope_theta=5000.0)
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**kw, **extra, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():  # HF inits norms to one and biases to zero; perturb so a dropped tensor would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def _save_ours(model, folder):
    hybrid_lm.save_model(model, folder)
    if not (folder / MANIFEST_NAME).exists():
        write_manifest(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_source(request, tmp_path_factory):
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    for name, text in TOKENIZER.items():
        (folder / name).write_text(text)
    return request.param, model, folder


def test_hf_import_and_all_dsa_keep_logits(hf_source, tmp_path):
    family, hf, folder = hf_source
    ids = _ids()
    ref = _logits(hf, ids)
    for spec, expected in (("none", "attention"), ("all", "dsa")):
        out = convert_checkpoint(folder, tmp_path / spec, dsa_layers=spec, index_topk=T, **INDEX)
        model = hybrid_lm.load_model(out).eval()
        assert model.config.layer_types == [expected] * 3
        assert _rel_diff(_logits(model, ids), ref) < 1e-4
        settings = model.config.mixer_config(expected)
        assert settings.qk_norm == (family == "qwen3") and settings.attention_bias == (family == "qwen2")
        ours = model.state_dict()
        for name, tensor in hf.state_dict().items():
            mapped = name.removeprefix("model.").replace(".self_attn.", ".mixer.")
            assert torch.equal(ours[mapped], tensor), name
        fresh = [n for n in ours if ".indexer." in n]
        assert bool(fresh) == (spec == "all") and len(ours) == len(hf.state_dict()) + len(fresh)
        for name, text in TOKENIZER.items():
            assert (out / name).read_text() == text
        info = json.loads((out / PROVENANCE_NAME).read_text())
        assert info["dsa_layers"] == ([0, 1, 2] if spec == "all" else [])
        assert info["source_kind"] == f"huggingface/{family}" and info["index_topk"] == T
        assert info["parameters_before"] == sum(p.numel() for p in hf.parameters())
        assert info["parameters_after"] == model.num_parameters()


def test_hf_topk_below_T_selects(hf_source, tmp_path):
    _, hf, folder = hf_source
    topk = 5
    ids = _ids()
    ref = _logits(hf, ids)
    model = hybrid_lm.load_model(convert_checkpoint(folder, tmp_path / "o", index_topk=topk, **INDEX)).eval()
    got = _logits(model, ids)
    # a position that sees <= topk keys keeps all of them in every layer; later ones lose some
    assert _rel_diff(got[:, :topk], ref[:, :topk]) < 1e-4
    assert _rel_diff(got[:, topk:], ref[:, topk:]) > 1e-3


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_hf_tied_and_other_weight_layouts(tmp_path, layout):
    hf = _hf_model("qwen3", tie_word_embeddings=True)
    src = tmp_path / "src"
    if layout == "sharded":
        hf.save_pretrained(src, max_shard_size="100KB")
        assert (src / "model.safetensors.index.json").is_file()
    else:
        hf.save_pretrained(src)
        (src / "model.safetensors").unlink()
        torch.save(hf.state_dict(), src / "pytorch_model.bin")
    model = hybrid_lm.load_model(convert_checkpoint(src, tmp_path / "o", index_topk=T, **INDEX)).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    ids = _ids()
    assert _rel_diff(_logits(model, ids), _logits(hf, ids)) < 1e-4


def test_hf_legacy_config_and_bf16(tmp_path):
    hf = _hf_model("llama")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    data = json.loads(path.read_text())  # the pre-5.x layout: flat rope_theta, rope_scaling null
    data.pop("rope_parameters")
    path.write_text(json.dumps({**data, "rope_theta": 5000.0, "rope_scaling": None}))
    model = hybrid_lm.load_model(convert_checkpoint(tmp_path / "src", tmp_path / "o", index_topk=T, **INDEX))
    assert model.config.rope_theta == 5000.0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.layers[2].mixer.k_proj.weight, hf.model.layers[2].self_attn.k_proj.weight)
    ids = _ids()
    assert _rel_diff(_logits(model.float(), ids), _logits(hf.float(), ids)) < 1e-4


def test_llama_attention_bias_needs_zero_o_proj_bias(tmp_path):
    hf = _hf_model("llama", attention_bias=True)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    hf.save_pretrained(tmp_path / "zero")
    model = hybrid_lm.load_model(convert_checkpoint(tmp_path / "zero", tmp_path / "o", index_topk=T, **INDEX))
    ids = _ids()
    assert _rel_diff(_logits(model, ids), _logits(hf, ids)) < 1e-4
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.bias.fill_(0.1)
    hf.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.o_proj\.bias"):
        convert_checkpoint(tmp_path / "nonzero", tmp_path / "o2", **INDEX)


def _ours_config():
    return hybrid_lm.config_from_dict(dict(
        name="tiny", vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, max_position_embeddings=64,
        layer_types=["attention", "gated_deltanet", "dsa", "attention"],
        mixers={"attention": {"qk_norm": True, "output_gate": True},
                "dsa": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 32},
                "gated_deltanet": {"num_heads": 2, "head_k_dim": 8, "head_v_dim": 8}}), "<test>")


@pytest.fixture
def ours_source(tmp_path):
    model = hybrid_lm.build_model(_ours_config()).eval()
    folder = _save_ours(model, tmp_path / "ours")
    (folder / "tokenizer.json").write_text(TOKENIZER["tokenizer.json"])
    return model, folder


def test_ours_subset_keeps_logits_and_tensors(ours_source, tmp_path):
    src_model, folder = ours_source
    out = convert_checkpoint(folder, tmp_path / "o", dsa_layers=[3], index_topk=T, **INDEX)
    model = hybrid_lm.load_model(out).eval()
    cfg = model.config
    assert cfg.layer_types == ["attention", "gated_deltanet", "dsa", "dsa_attention"]
    assert cfg.mixer_type("dsa_attention") == "dsa" and cfg.name == "tiny-dsa"
    new, old = cfg.mixer_config("dsa_attention"), cfg.mixer_config("dsa")
    assert (new.qk_norm, new.output_gate, new.index_n_heads, new.index_topk) == (True, True, 2, T)
    assert old == src_model.config.mixer_config("dsa")
    ids = _ids()
    assert _rel_diff(_logits(model, ids), _logits(src_model, ids)) < 1e-5
    before, after = src_model.state_dict(), model.state_dict()
    assert set(after) - set(before) == {n for n in after if n.startswith("layers.3.mixer.indexer.")}
    assert all(torch.equal(after[n], t) for n, t in before.items())  # the existing DSA indexer included
    assert (out / "tokenizer.json").read_text() == TOKENIZER["tokenizer.json"]


def test_ours_all_converts_attention_only(ours_source, tmp_path):
    _, folder = ours_source
    model = hybrid_lm.load_model(convert_checkpoint(folder, tmp_path / "o", **INDEX))
    assert model.config.layer_types == ["dsa_attention", "gated_deltanet", "dsa", "dsa_attention"]
    assert "attention" not in model.config.mixers


def test_ours_rejects_non_attention_layers(ours_source, tmp_path):
    _, folder = ours_source
    with pytest.raises(ValueError, match=r"layer 1 is a 'gated_deltanet' layer"):
        convert_checkpoint(folder, tmp_path / "o", dsa_layers=[0, 1])
    with pytest.raises(ValueError, match=r"layer 2 is a 'dsa' layer"):
        convert_checkpoint(folder, tmp_path / "o", dsa_layers=[2])
    with pytest.raises(ValueError, match=r"layer 7 does not exist"):
        convert_checkpoint(folder, tmp_path / "o", dsa_layers="0,7")
    assert not (tmp_path / "o").exists()


def test_indexer_init_is_seeded(ours_source, tmp_path):
    _, folder = ours_source
    kw = dict(dsa_layers="0,3", index_n_heads=4, index_head_dim=32)
    a, b, c = (hybrid_lm.load_model(convert_checkpoint(folder, tmp_path / name, seed=seed, **kw))
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = (m.layers[3].mixer.indexer.wq.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert abs(wa.std().item() - a.config.initializer_range) < 0.1 * a.config.initializer_range
    assert not torch.equal(a.layers[0].mixer.indexer.wq.weight, wa)  # layers get independent draws
    assert torch.equal(a.layers[3].mixer.indexer.k_norm.weight, torch.ones(32))


def test_converted_model_trains_dense_warmup_then_sparse(hf_source, tmp_path):
    _, _, folder = hf_source
    model = hybrid_lm.load_model(convert_checkpoint(folder, tmp_path / "o", index_topk=4, **INDEX)).train()
    ids = _ids()
    indexer = {id(p) for p in model.indexer_parameters()}
    assert indexer
    model.set_dsa_stage("dense_warmup")
    out = model(ids, labels=ids)
    out.aux_loss.backward()
    for name, p in model.named_parameters():
        if id(p) in indexer:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    model.set_dsa_stage("sparse")
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _hf_config_folder(tmp_path, family="llama", **changes):
    """A folder with only a (modified) config.json: config errors come before any weight is read."""
    folder = tmp_path / f"cfg-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    data = _hf_model(family).config.to_dict()
    data.update({"architectures": [FAMILIES[family][1].__name__], **changes})
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "mistral"}, r"'model_type' = 'mistral'.*llama/qwen2/qwen3"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, r"rope_parameters\.rope_type"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     r"rope_scaling\.rope_type"),
    ({"mlp_bias": True}, r"'mlp_bias'"),
    ({"hidden_act": "gelu"}, r"'hidden_act' = 'gelu'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"'architectures'"),
    ({"partial_rotary_factor": 0.5}, r"'partial_rotary_factor'"),
])
def test_hf_config_refusals(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(_hf_config_folder(tmp_path, **changes), tmp_path / "o")


@pytest.mark.parametrize("layer_types", [["full_attention", "sliding_attention", "sliding_attention"], None])
def test_qwen2_sliding_window_refused(tmp_path, layer_types):
    folder = _hf_config_folder(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                               layer_types=layer_types)
    with pytest.raises(ValueError, match=r"use_sliding_window.*layers \[1, 2\]"):
        convert_checkpoint(folder, tmp_path / "o")


def test_qwen2_unused_sliding_window_accepted():
    # Qwen2.5 ships sliding_window set but use_sliding_window false: every layer is full attention
    hf = dict(_hf_model("qwen2").config.to_dict(), use_sliding_window=False, sliding_window=4096, max_window_layers=1,
              layer_types=None)
    cfg = hf_config_to_ours(hf)
    assert cfg.layer_types == ["attention"] * 3 and cfg.mixer_config("attention").sliding_window is None


def test_bad_inputs(tmp_path, hf_source):
    _, _, folder = hf_source
    with pytest.raises(ValueError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(ValueError, match="no weights"):
        convert_checkpoint(_hf_config_folder(tmp_path), tmp_path / "o")
    with pytest.raises(ValueError, match="--dsa-layers"):
        parse_dsa_layers("first")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="--force"):
        convert_checkpoint(folder, busy, dsa_layers="none")
    assert (busy / "keep.txt").exists()
    convert_checkpoint(folder, busy, dsa_layers="none", force=True)
    assert not (busy / "keep.txt").exists() and hybrid_lm.load_model(busy) is not None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_cli(hf_source, tmp_path, capsys):
    _, _, folder = hf_source
    out = tmp_path / "o"
    rc = cli_main(["convert", str(folder), str(out), "--dsa-layers", "0,2", "--index-heads", "2",
                   "--index-head-dim", "16", "--index-topk", "64", "--seed", "3"])
    printed = capsys.readouterr().out
    assert rc == 0 and "[0, 2]" in printed and str(out.resolve()) in printed and "->" in printed
    assert hybrid_lm.load_model(out).config.layer_types == ["dsa", "attention", "dsa"]
    assert cli_main(["convert", str(folder), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    shutil.rmtree(out)
