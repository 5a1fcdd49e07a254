"""Probe used to choose the CPU comparison recipe (train/configs/compare/cpu.yaml): trains one tiny model on pure
MQAR (no text) with a plain AdamW loop, loss on the answers only, and prints teacher-forced accuracy on fresh
samples (held-out filler) every 25 steps. Not part of the package; kept so the numbers in probes.md can be rerun:

    .venv/bin/python train/results/compare-cpu-2026-12-06b/probe_mqar.py --arch gdn-dsa --lr 3e-4 --rows 32 \
        --pairs 4 --minlen 32 --maxlen 64 --pool 32 --steps 800 --evallen 256 --evallen2 64
"""
import argparse, time, math, sys
import numpy as np, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import hybrid_lm
from hybrid_lm.data import DataConfig, prepare_data, load_tokenizer
from hybrid_lm.eval.tasks import RecallVocab, Filler, make_mqar

p = argparse.ArgumentParser()
p.add_argument("--arch", default="dense")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--pool", type=int, default=32)
p.add_argument("--pairs", type=int, default=4)
p.add_argument("--minlen", type=int, default=32)
p.add_argument("--maxlen", type=int, default=64)
p.add_argument("--evallen", type=int, default=64)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--rows", type=int, default=32)
p.add_argument("--wd", type=float, default=0.1)
p.add_argument("--warmup", type=int, default=30)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--randpairs", action="store_true", help="num pairs uniform 1..pairs")
p.add_argument("--rope", type=float, default=None)
p.add_argument("--ov", default="{}")
p.add_argument("--analyze", action="store_true")
p.add_argument("--loguni", action="store_true")
p.add_argument("--final-pairs", default="", help="after training: accuracy with these pair counts, e.g. 4,8,16")
p.add_argument("--final-lens", default="64,512")
p.add_argument("--evallen2", type=int, default=64)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
prep = prepare_data(DataConfig(source="shakespeare", vocab_size=4096))
tok = load_tokenizer(prep.tokenizer_path)[0]
vocab = RecallVocab.from_tokenizer(tok, prep.vocab_size, [prep.eos_id], pool_size=a.pool)
trf, evf = Filler(prep.train, prep.eos_id), Filler(prep.val, prep.eos_id)
zoo = {"dense": ("dense-125m", "attention"), "gdn": ("gdn-125m", "gated_deltanet"),
       "gdn-attn": ("gdn-attn-125m", "attention"), "gdn-dsa": ("gdn-dsa-125m", "dsa")}
name, last = zoo[a.arch]
cfg = hybrid_lm.load_config(str(ROOT / "model_configs" / f"{name}.yaml"))
if a.arch == "dense": lt = ["attention"] * a.layers
elif a.arch == "gdn": lt = ["gated_deltanet"] * a.layers
elif a.layers <= 2: lt = ["gated_deltanet"] * (a.layers - 1) + [last]
else: lt = [last if i % 4 == 3 or i == a.layers - 1 else "gated_deltanet" for i in range(a.layers)]
mixers = {"gated_deltanet": {"num_heads": 2, "head_k_dim": 32, "head_v_dim": 64}}
if a.arch == "gdn-attn": mixers["attention"] = {"partial_rotary_factor": 0.5 if a.rope is None else a.rope}
if a.arch == "gdn-dsa": mixers["dsa"] = {"index_n_heads": 2, "index_head_dim": 32, "index_topk": 64}
ov = dict(vocab_size=4096, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
          num_key_value_heads=2, head_dim=a.hidden // 4, intermediate_size=3 * a.hidden, max_position_embeddings=16384,
          layer_types=lt, mixers=mixers)
import json
for k, v in json.loads(a.ov).items():
    if k == 'mixers':
        for m, d in v.items(): mixers.setdefault(m, {}).update(d)
    else: ov[k] = v
model = hybrid_lm.build_model(hybrid_lm.config_replace(cfg, **ov)).float()
if a.arch == "gdn-dsa": model.set_dsa_stage("sparse")
print(lt, sum(p.numel() for p in model.parameters()) / 1e6, "M params", flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.95))
rng = np.random.default_rng(1)
def batch(rng, filler, length, pairs_fn):
    ids, labels = [], []
    for _ in range(a.rows):
        s = make_mqar(rng, length, vocab, filler, num_pairs=pairs_fn())
        lab = np.full(len(s.input_ids), -100); 
        for pos in s.answers: lab[pos] = s.input_ids[pos]
        ids.append(s.input_ids); labels.append(lab)
    return torch.tensor(np.stack(ids)), torch.tensor(np.stack(labels))
@torch.no_grad()
def evaluate(L, pairs=None):
    model.eval(); r = np.random.default_rng([7, L]); right = tot = 0
    for _ in range(2):
        ids, lab = batch(r, evf, L, lambda: pairs or a.pairs)
        lg = model(ids).logits[:, :-1]; t = lab[:, 1:]; m = t != -100
        right += int((lg.argmax(-1)[m] == t[m]).sum()); tot += int(m.sum())
    if a.analyze:
        r = np.random.default_rng([8, L]); byctx = np.zeros(a.pairs); byq = np.zeros(a.pairs); n = 0
        for _ in range(4):
            for _ in range(8):
                s = make_mqar(r, L, vocab, evf, num_pairs=a.pairs)
                ids = torch.tensor(s.input_ids)[None]
                lg = model(ids).logits[0]
                keys = s.input_ids[0:2*a.pairs:2]
                for qi, pos in enumerate(s.answers):
                    ok = int(lg[pos[0]-1].argmax()) == int(s.input_ids[pos[0]])
                    ci = int(np.flatnonzero(keys == s.input_ids[pos[0]-1])[0])
                    byctx[ci] += ok; byq[qi] += ok
                n += 1
        print("by context pair", (byctx / n).round(2), "by query order", (byq / n).round(2))
    model.train(); return right / tot
t0 = time.time(); ntok = 0
for step in range(1, a.steps + 1):
    lr = a.lr * min(1, step / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
    for g in opt.param_groups: g["lr"] = lr
    if a.loguni:
        L = int(np.exp(rng.uniform(np.log(a.minlen), np.log(a.maxlen + 1))))
    else:
        L = int(rng.integers(a.minlen, a.maxlen + 1))
    L = max(L, 4 * a.pairs)
    pairs = (lambda: int(rng.integers(1, min(a.pairs, L // 4) + 1))) if a.randpairs else (lambda: a.pairs)
    ids, lab = batch(rng, trf, L, pairs)
    out = model(ids, labels=lab)
    loss = out.loss + out.aux_loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    ntok += ids.numel()
    if step % 25 == 0 or step == a.steps:
        print(f"step {step} loss {out.loss.item():.3f} tok {ntok} {ntok/(time.time()-t0):.0f} tok/s "
              f"acc@{a.evallen} {evaluate(a.evallen):.2f} acc@{a.evallen2} {evaluate(a.evallen2):.2f}", flush=True)
if a.final_pairs:
    a.analyze = False
    for n in map(int, a.final_pairs.split(",")):
        accs = {L: evaluate(L, n) for L in map(int, a.final_lens.split(",")) if L >= 4 * n}
        print(f"final: {n} pairs: " + ", ".join(f"acc@{L} {v:.2f}" for L, v in accs.items()), flush=True)
