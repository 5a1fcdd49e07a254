"""The Hugging Face side of the export tests, run in a fresh interpreter where `hybrid_lm` cannot be imported.

    python hf_side.py JOB.json

For each exported folder in the job: load it with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
and record fp32 logits, a greedy generation (with the token counts each forward was fed), the cache it kept, the loss
with labels, hidden states, and for folders with a tokenizer the text `pipeline("text-generation")` returns. The
parent test compares everything with the native model. Shapes: prompts `[B, T]`.
"""

import importlib.util
import json
import sys
from pathlib import Path


class _Blocker:
    """Refuses hybrid_lm when it is installed into site-packages (not editable), where no path can be dropped."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] == "hybrid_lm":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the export test)")
        return None


def hide_hybrid_lm(repo_root: str) -> None:
    """Make `import hybrid_lm` impossible: drop the editable-install finder and every path that reaches the repo."""
    root = Path(repo_root).resolve()
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in str(getattr(h, "__module__", ""))]
    sys.path[:] = [p for p in sys.path if p and "__editable__" not in p and Path(p).resolve() != root]
    sys.path_importer_cache.clear()
    if importlib.util.find_spec("hybrid_lm") is not None:
        sys.meta_path.insert(0, _Blocker)
    try:
        import hybrid_lm  # noqa: F401
    except ImportError:
        return
    raise AssertionError("hybrid_lm is still importable")


def run_case(case: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True).eval()
    prompt = torch.tensor(case["prompt"])
    result = {"module": type(model).__module__, "dtype": str(model.dtype)}
    with torch.no_grad():
        out = model(prompt, labels=prompt, output_hidden_states=True, use_cache=False)
    result.update(logits=out.logits, loss=out.loss, hidden_states=list(out.hidden_states))
    fed = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda mod, args: fed.append(args[0].shape[1]))
    gen = model.generate(prompt, max_new_tokens=case["max_new_tokens"], do_sample=False,
                         return_dict_in_generate=True)
    hook.remove()
    cache = gen["cache"] if "cache" in gen else gen["past_key_values"]
    result.update(generated=gen.sequences, fed=fed, cache_type=type(cache).__name__, cache_len=cache.get_seq_length(),
                  cache_keys=[sorted(layer) for layer in cache.layers])
    if case.get("pipeline"):
        from transformers import pipeline

        generator = pipeline("text-generation", model=case["dir"], trust_remote_code=True)
        result["pipeline"] = generator(case["text"], max_new_tokens=8, do_sample=False)[0]["generated_text"]
    return result


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    hide_hybrid_lm(job["repo_root"])
    import torch

    results = {case["name"]: run_case(case) for case in job["cases"]}
    results["_hybrid_lm_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "hybrid_lm")
    torch.save(results, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
