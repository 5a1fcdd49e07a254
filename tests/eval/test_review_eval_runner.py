"""Review checks of `evaluate`'s cached cells: a cell computed under other settings is never reused."""

from hybrid_lm.eval import runner
from hybrid_lm.eval.runner import EvalConfig, evaluate

SMALL = dict(tasks=["perplexity", "passkey"], lengths=[64], samples=2, ppl_tokens=128, batch_tokens=256)


def _count(monkeypatch) -> dict:
    state = {"calls": 0}
    original = runner._Context.compute

    def compute(self, cell):
        state["calls"] += 1
        return original(self, cell)

    monkeypatch.setattr(runner._Context, "compute", compute)
    return state


def test_a_bf16_rerun_does_not_reuse_fp32_cells(saved_model, tmp_path, monkeypatch):
    counting = _count(monkeypatch)
    fp32 = evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, progress=False)
    counting["calls"] = 0
    bf16 = evaluate(saved_model, EvalConfig(**SMALL, dtype="bf16"), out_dir=tmp_path, progress=False)
    assert counting["calls"] == len(fp32["cells"])  # every cell recomputed under autocast
    assert bf16["cells"][0]["loss"] != fp32["cells"][0]["loss"]
    counting["calls"] = 0
    evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, progress=False)
    assert counting["calls"] == 0  # the fp32 cells are still there
