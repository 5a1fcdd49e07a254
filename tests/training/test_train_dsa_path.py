"""The dense -> DSA path of train/README.md in miniature: pretrain dense, convert, dense warm-up, sparse training;
plus continuing a saved model with `init_from` and `model_overrides`."""

import pytest
import torch

import hybrid_lm
from hybrid_lm.convert import convert_checkpoint
from hybrid_lm.layers.dsa import DeepSeekSparseAttention
from hybrid_lm.training import Trainer, load_train_config, train
from hybrid_lm.training.monitor import read_metrics

DENSE = {"name": "tiny-dense", "layer_types": ["attention"] * 4}


def _dsa(model):
    return [m for m in model.modules() if isinstance(m, DeepSeekSparseAttention)]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_dense_to_dsa_path(write_config, tmp_path):
    dense = train(load_train_config(write_config("dense", dsa_stage="none", model_overrides=DENSE, max_steps=3)))
    converted = convert_checkpoint(dense.run_dir, tmp_path / "converted", dsa_layers="all", index_n_heads=2,
                                   index_head_dim=8, index_topk=8)
    assert (converted / "tokenizer.json").is_file()

    warm_cfg = write_config("warmup", model=None, init_from=str(converted), dsa_stage="dense_warmup", max_steps=3,
                            optim={"lr": 1e-3, "min_lr": 1e-3, "schedule": "constant"}, eval_at_start=True)
    trainer = Trainer(load_train_config(warm_cfg))
    assert trainer.raw.config.layer_types == ["dsa"] * 4
    assert trainer.cfg.data.tokenizer == str(converted / "tokenizer.json")  # the model's own vocabulary
    start = _params(trainer.raw)
    for name, p in hybrid_lm.load_model(dense.run_dir).named_parameters():
        assert torch.equal(start[name], p.detach())  # init_from starts from the converted weights
    # evals run the inference model: top-8 selection by the (fresh) indexer, not the warm-up's dense forward
    sparse_eval = trainer.evaluate()
    assert sparse_eval != pytest.approx(dense.eval_loss, abs=1e-4)
    assert trainer.raw.training and all(m.dsa_stage == "dense_warmup" for m in _dsa(trainer.raw))  # restored
    for m in _dsa(trainer.raw):
        m.topk = 32  # = seq_len: every key kept, the dense model's loss
    assert trainer.evaluate() == pytest.approx(dense.eval_loss, abs=1e-5)
    for m in _dsa(trainer.raw):
        m.topk = 8
    warm = trainer.fit()
    moved = {n for n, p in trainer.raw.named_parameters() if not torch.equal(start[n], p.detach())}
    assert moved == {n for n in start if ".indexer." in n}
    evals = [(r["step"], r["eval_loss"]) for r in read_metrics(warm.run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 3] and evals[0][1] == pytest.approx(sparse_eval)  # eval_at_start
    assert (warm.run_dir / "dsa.png").is_file()

    sparse = train(load_train_config(write_config("sparse", model=None, init_from=str(warm.run_dir),
                                                  dsa_stage="sparse", max_steps=2)))
    assert sparse.status == "done" and all(v == v for v in sparse.losses.values())
    assert hybrid_lm.load_model(sparse.run_dir).config.layer_types == ["dsa"] * 4


def test_init_from_with_model_overrides(write_config):
    base = train(load_train_config(write_config("base", max_steps=2, sample_tokens=0)))
    cfg = load_train_config(write_config("more", model=None, init_from=str(base.run_dir), max_steps=1,
                                         model_overrides={"mixers": {"dsa": {"index_topk": 4}}}))
    trainer = Trainer(cfg)
    assert trainer.raw.config.mixers["dsa"].index_topk == 4
    before = hybrid_lm.load_model(base.run_dir)
    for (name, p), (_, q) in zip(trainer.raw.named_parameters(), before.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    bad = load_train_config(write_config("bad", model=None, init_from=str(base.run_dir),
                                         model_overrides={"hidden_size": 48}))
    with pytest.raises(ValueError, match="hybrid-lm convert"):
        Trainer(bad)


def test_init_from_a_model_without_its_tokenizer_asks_for_it(write_config, tmp_path):
    # a freshly trained tokenizer's ids would mean other tokens to the saved embeddings
    hybrid_lm.save_model(hybrid_lm.build_model(hybrid_lm.load_config(load_train_config(write_config()).model)),
                         tmp_path / "bare")
    cfg = load_train_config(write_config("bare", model=None, init_from=str(tmp_path / "bare"), max_steps=1))
    with pytest.raises(ValueError, match="holds no tokenizer.json: set data.tokenizer"):
        Trainer(cfg)
