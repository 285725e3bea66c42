"""Merge init per MoE family: top-1 agreement of the cut student with a random-weight tiny teacher (docs/distillation.md).

Run: python benchmarks/moe_family_agreement.py [OUT.json]   (transformers 5; about a minute on 2 cores)
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
torch.set_num_threads(1)
from test_moe_families import MOE, tiny_config
from transformers import AutoModelForCausalLM

from dsk_compress.compress.moe import Experts, describe_layout, family, moe_blocks, router_of
from dsk_compress.compress.student import build_student
from dsk_compress.tasks.code_lm import CodeLMTask

task = CodeLMTask(seq_len=64, eval_sequences=16)
calib = [torch.as_tensor(task.train_batch(i, 4)) for i in range(2)]
x = torch.as_tensor(task.example_inputs(16))
rows = []
for kind in MOE:
    torch.manual_seed(0)
    wide = {"hidden_size": 64, **({"head_dim": 16} if kind in ("qwen3_moe", "glm4_moe", "gpt_oss") else {})}
    t = AutoModelForCausalLM.from_config(
        tiny_config(kind, vocab_size=256, max_position_embeddings=128, **wide), attn_implementation="eager"
    ).eval()
    fam = family(t.config)
    with torch.no_grad():
        for _, b in moe_blocks(t):
            router_of(fam, b).weight.normal_(0, 0.3)

    def agree(s, t=t):
        with torch.no_grad():
            a, b = t(input_ids=x, use_cache=False).logits, s(input_ids=x, use_cache=False).logits
        return 100.0 * float((a.argmax(-1) == b.argmax(-1)).float().mean())

    full, _ = build_student(
        t,
        keep_every=1,
        ffn_init="merge",
        calibration=calib,
        intermediate_size=max(
            Experts(b, fam).expert(0).gate.shape[0] * len(Experts(b, fam))
            + (getattr(b, fam.shared).gate_proj.out_features if fam.shared else 0)
            for _, b in moe_blocks(t)
        ),
    )
    one, _ = build_student(t, keep_every=1, ffn_init="merge", calibration=calib)
    rnd, _ = build_student(t, keep_every=1, ffn_init="random", calibration=calib)
    rows.append((kind, describe_layout(t), type(full).__name__, agree(full), agree(one), agree(rnd)))
    print(rows[-1], flush=True)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "moe_family_agreement.json")
out.write_text(
    json.dumps(
        [dict(zip(("family", "layout", "student", "agree_full_merge", "agree_one_expert_width", "agree_random_ffn"), r)) for r in rows],
        indent=2,
    )
)
print(out)
