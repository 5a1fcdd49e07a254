"""The exported model on a CUDA GPU, where the ops pick their fast backends (SDPA, and flash-attn / fla when
installed): transformers' model must give the native model's logits and greedy tokens there too."""

import pytest
import torch

from hybrid_lm.hf import export_hf

from .test_export import MIXED, save_checkpoint, tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_logits_and_greedy_generation_match_native(tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    native = tiny(MIXED, tie_word_embeddings=True)
    save_checkpoint(native, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / f"hf_gpu_{str(dtype).split('.')[-1]}")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=dtype).to("cuda").eval()
    native = native.to(device="cuda", dtype=dtype).eval()
    prompt = torch.randint(1, 300, (2, 12), device="cuda")
    with torch.no_grad():
        got, want = hf(prompt).logits.float(), native(prompt).logits.float()
    assert ((got - want).norm() / want.norm()).item() < tol
    fed = []
    hf.get_input_embeddings().register_forward_pre_hook(lambda mod, args: fed.append(args[0].shape[1]))
    tokens = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, native.generate(prompt, max_new_tokens=8))
    assert fed == [12] + [1] * 7
