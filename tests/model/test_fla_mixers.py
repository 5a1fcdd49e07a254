"""fla's token mixers in the registry (layers/fla_mixers.py), on CPU: the names, config validation and the errors
without fla or a GPU. The adapter itself (keyword arguments, packed documents, the decoding cache) runs against a
small fake `fla` package that follows fla's layer interface; the real layers run in tests/gpu/test_fla_mixers.py."""

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import hybrid_lm
from hybrid_lm.layers import fla_mixers
from hybrid_lm.zoo import mixer_lines

from .helpers import tiny_config


class FakeGLA(nn.Module):
    """fla-like layer: a decayed running sum of a projection, reading `cu_seqlens` and fla's cache protocol."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=0.5, num_heads=4, layer_idx=None, **kwargs):
        super().__init__()
        self.mode, self.num_heads, self.layer_idx = mode, num_heads, layer_idx
        self.head_k_dim = self.head_v_dim = int(hidden_size * expand_k) // num_heads
        self.v_proj = nn.Linear(hidden_size, int(hidden_size * expand_k), bias=False)
        self.o_proj = nn.Linear(int(hidden_size * expand_k), hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        cu_seqlens = kwargs.get('cu_seqlens')
        last = past_key_values[self.layer_idx] if past_key_values is not None and len(past_key_values) > \
            self.layer_idx else None
        return decayed_sum(self, hidden_states, last, past_key_values, cu_seqlens)


class FakeMamba2(nn.Module):
    """Like fla's Mamba2: `num_heads` required, `head_dim` / `expand` defaults, no **kwargs, ignores cu_seqlens."""

    def __init__(self, num_heads, head_dim=64, hidden_size=2048, expand=2, layer_idx=None):
        super().__init__()
        assert num_heads * head_dim == expand * hidden_size, "num_heads * head_dim must be expand * hidden_size"
        self.num_heads, self.head_dim, self.layer_idx = num_heads, head_dim, layer_idx
        self.v_proj = nn.Linear(hidden_size, expand * hidden_size, bias=False)
        self.o_proj = nn.Linear(expand * hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        last = past_key_values[self.layer_idx] if past_key_values is not None and len(past_key_values) > \
            self.layer_idx else None
        return decayed_sum(self, hidden_states, last, past_key_values, None)


def decayed_sum(layer, x, last, cache, cu_seqlens):
    v = layer.v_proj(x)
    state = last["recurrent_state"] if last is not None else v.new_zeros(v.shape[0], v.shape[-1])
    starts = set(cu_seqlens[:-1].tolist()) if cu_seqlens is not None else set()
    outs = []
    for t in range(x.shape[1]):
        state = (0 if t in starts else 0.8 * state) + v[:, t]
        outs.append(state)
    if cache is not None:
        cache.update(recurrent_state=state, layer_idx=layer.layer_idx, offset=x.shape[1])
    return layer.o_proj(torch.stack(outs, 1)), None, cache


@pytest.fixture
def no_fla(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla` raises, as when it is not installed


@pytest.fixture
def fake_fla(monkeypatch):
    """A fake `fla` with two layers, a CUDA check that passes, and CPU tensors accepted."""
    root, layers = types.ModuleType("fla"), types.ModuleType("fla.layers")
    gla, mamba2 = types.ModuleType("fla.layers.gla"), types.ModuleType("fla.layers.mamba2")
    gla.GatedLinearAttention, mamba2.Mamba2 = FakeGLA, FakeMamba2
    for module in (root, layers, gla, mamba2):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "fla.layers.kda", types.ModuleType("fla.layers.kda"))  # a class it lacks
    monkeypatch.setattr(fla_mixers, "_cuda_available", lambda: True)
    monkeypatch.setattr(fla_mixers, "_check_device", lambda x, name: None)


def fla_config(layer_types, **mixers):
    return tiny_config(layer_types, mixers=mixers)


def test_every_fla_name_is_registered_and_listed():
    names = hybrid_lm.mixer_names()
    for name in ("fla_kda", "fla_gla", "fla_mamba2", "fla_deltanet", "fla_hgrn2"):
        assert name in names
        spec = hybrid_lm.get_mixer(name)
        assert spec.requires is not None and "CUDA" in spec.requires
    assert hybrid_lm.get_mixer("attention").requires is None
    listed = "\n".join(mixer_lines())
    assert "fla_kda" in listed and "need fla" in listed


def test_yaml_validates_without_fla_and_building_says_what_to_install(no_fla, tmp_path):
    cfg = fla_config(["fla_gla", "attention"], fla_gla={"expand_k": 0.25, "num_heads": 2},
                     local={"type": "fla_kda"})
    assert cfg.mixers["fla_gla"].options == {"expand_k": 0.25, "num_heads": 2}
    hybrid_lm.save_config(cfg, tmp_path / "m.yaml")
    assert "expand_k: 0.25" in (tmp_path / "m.yaml").read_text()  # written back flat
    assert hybrid_lm.load_config(tmp_path / "m.yaml") == cfg
    with pytest.raises(RuntimeError, match=r"fla_gla.*GatedLinearAttention.*pip install -e \"\.\[gpu\]\""):
        hybrid_lm.build_model(cfg)


def test_the_gpu_only_example_config_validates_on_cpu(no_fla):
    path = Path(hybrid_lm.__file__).resolve().parents[1] / "model_configs" / "gpu" / "kda-attn-125m.yaml"
    assert "GPU ONLY" in path.read_text()
    cfg = hybrid_lm.load_config(path)
    assert cfg.layer_types[:4] == ["fla_kda"] * 3 + ["attention"] and cfg.mixers["fla_kda"].options["head_dim"] == 128
    with pytest.raises(RuntimeError, match="fla_kda.*KimiDeltaAttention.*does not import"):
        hybrid_lm.build_model(cfg, device="meta")


def test_settings_the_model_owns_are_refused(no_fla):
    with pytest.raises(ValueError, match="hidden_size = 7: set by the model"):
        fla_config(["fla_gla"], fla_gla={"hidden_size": 7})


def test_building_without_a_gpu_says_so(fake_fla, monkeypatch):
    monkeypatch.setattr(fla_mixers, "_cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="fla_gla.*need a CUDA GPU"):
        hybrid_lm.build_model(fla_config(["fla_gla"]))


def test_forward_on_cpu_tensors_says_to_move_to_cuda():
    with pytest.raises(RuntimeError, match="fla_gla.*CUDA device"):
        fla_mixers._check_device(torch.zeros(1), "fla_gla")


def test_unknown_keys_are_checked_against_the_fla_signature(fake_fla):
    with pytest.raises(ValueError, match=r"unknown key 'expand_q' = 2 for fla's FakeGLA; valid keys: expand_k, "
                                         r"mode, num_heads"):
        fla_config(["fla_gla"], fla_gla={"expand_q": 2})  # FakeGLA's **kwargs would swallow the typo
    with pytest.raises(ValueError, match="FakeMamba2.*refused its settings.*expand \\* hidden_size"):
        hybrid_lm.build_model(fla_config(["fla_mamba2"], fla_mamba2={"num_heads": 3}))
    with pytest.raises(RuntimeError, match="no fla.layers.kda.KimiDeltaAttention; upgrade"):
        hybrid_lm.build_model(fla_config(["fla_kda"]))


def test_keyword_arguments_reach_the_fla_layer(fake_fla):
    model = hybrid_lm.build_model(fla_config(["fla_gla", "fla_mamba2", "gla2"], fla_gla={"num_heads": 2},
                                             gla2={"type": "fla_gla", "expand_k": 1.0, "mode": "fused_chunk"}))
    gla, mamba2, gla2 = (block.mixer.layer for block in model.layers)
    assert (gla.num_heads, gla.head_k_dim, gla.layer_idx) == (2, 8, 0)
    assert (mamba2.num_heads, mamba2.head_dim, mamba2.layer_idx) == (1, 64, 1)  # 2 * 32 / 64 heads, derived
    assert (gla2.num_heads, gla2.head_k_dim, gla2.layer_idx) == (4, 8, 2)
    assert "layers.0.mixer.layer.v_proj.weight" in model.state_dict()
    # documents run one by one where the layer ignores cu_seqlens: Mamba2, and fla's fused_chunk kernels
    assert [block.mixer.varlen for block in model.layers] == [True, False, False]
    assert model.layers[0].mixer.flops_per_token(64) == 2 * (6 * 8 * 8 + 2 * 64 * 16)


def test_training_step_and_packed_documents(fake_fla):
    torch.manual_seed(0)
    model = hybrid_lm.build_model(fla_config(["fla_gla", "attention", "fla_mamba2"]))
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = model(ids, cu_seqlens=cu, labels=ids)
    out.loss.backward()
    for i in (0, 2):
        assert model.layers[i].mixer.layer.v_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # no state crosses a document: each document's logits are those of its own forward
        packed = model(ids, cu_seqlens=cu).logits
        alone = torch.cat([model(ids[:, :7]).logits, model(ids[:, 7:]).logits], dim=1)
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        assert (model(ids).logits[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # unpacked, the state does cross


def test_cached_decoding_matches_the_full_forward(fake_fla):
    torch.manual_seed(0)
    model = hybrid_lm.build_model(fla_config(["fla_gla", "attention", "fla_mamba2"])).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                            for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, atol=1e-5, rtol=1e-5)
        assert cache.layers[0]["seen_tokens"] == 12 and cache.layers[0]["recurrent_state"].shape == (2, 16)
        with pytest.raises(NotImplementedError, match="fla_mamba2.*one token at a time"):
            model(ids[:, :2], cache=cache)


@pytest.mark.parametrize("triton_3_7_1, fla_version, mode, refused", [
    (False, "0.6.0", "chunk", True), (True, "0.6.0", "chunk", False), (False, "0.7.0", "chunk", False),
    (False, "0.6.0", "fused_recurrent", False)])
def test_simple_gla_says_it_cannot_train_where_fla_refuses_its_backward(fake_fla, monkeypatch, triton_3_7_1,
                                                                          fla_version, mode, refused):
    simple_gla, utils = types.ModuleType("fla.layers.simple_gla"), types.ModuleType("fla.utils")
    simple_gla.SimpleGatedLinearAttention = FakeGLA
    utils.IS_NVIDIA_HOPPER, utils.TRITON_ABOVE_3_4_0, utils.TRITON_ABOVE_3_7_1 = True, True, triton_3_7_1
    monkeypatch.setitem(sys.modules, simple_gla.__name__, simple_gla)
    monkeypatch.setitem(sys.modules, utils.__name__, utils)
    monkeypatch.setattr(sys.modules["fla"], "__version__", fla_version, raising=False)
    model = hybrid_lm.build_model(fla_config(["fla_simple_gla", "attention"], fla_simple_gla={"mode": mode}))
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():  # evaluation and generation run either way
        model(ids)
    if refused:
        with pytest.raises(RuntimeError, match=r"'fla_simple_gla' cannot train on this machine: fla 0\.6\.0 .*"
                                               r"Upgrade triton to >= 3\.7\.1"):
            model(ids, labels=ids)
    else:
        model(ids, labels=ids).loss.backward()
        assert model.layers[0].mixer.layer.v_proj.weight.grad.abs().sum() > 0


def test_cache_view_keeps_key_value_states_within_a_window():
    state = {}
    view = fla_mixers._LayerCache(3, state)
    assert len(view) == 3  # fla reads len(cache) > layer_idx as "no state yet"
    kv = (torch.zeros(1, 4, 2), torch.ones(1, 4, 2))
    view.update(attn_state=kv, layer_idx=3, offset=4, cache_kwargs={"window_size": 5})
    view.update(attn_state=tuple(t[:, :2] + 2 for t in kv), layer_idx=3, offset=2,
                cache_kwargs={"window_size": 5})
    assert len(view) == 4 and view[3] is state and view.get_seq_length() == 6
    assert state["attn_state"][1][0, :, 0].tolist() == [1, 1, 1, 3, 3]
