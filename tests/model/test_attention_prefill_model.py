"""The text model's prefill on the sm_90a attention kernel, end to end against transformers.

Tiny random Gemma 4 checkpoints with Gemma 4's real head dims (256 sliding, 512 full) and a
prompt longer than the sliding window: our CUDA bf16 forward must route every attention layer of
the prompt to ``ops.attention_varlen`` and its logits must stay within 2x HF CUDA bf16's error
against HF fp32 (the same bar as tests/model/test_text_model.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemma4_tiny as gt  # noqa: E402

pytest.importorskip("transformers")
pytestmark = pytest.mark.cuda

REAL_DIMS = {"head_dim": 256, "global_head_dim": 512, "sliding_window": 64, "max_position_embeddings": 1024}


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="sm_90a kernel"
)
@pytest.mark.parametrize("name", ["dense", "moe_text", "e2b_text", "pattern"])
def test_prefill_on_kernel_matches_hf(tmp_path, name, monkeypatch):
    from test_text_model import build, our_logits, rel_err
    from transformers import Gemma4ForCausalLM

    from gemma4x.ops import attention as attn_ops

    base = {"dense": gt.DENSE, "moe_text": gt.MOE_TEXT, "e2b_text": gt.E2B_TEXT, "pattern": gt.PATTERN}[name]
    cfg = {**base, **REAL_DIMS}
    hf32 = gt.make_checkpoint(cfg, tmp_path, seed=3)
    calls = []
    real = attn_ops.attention_varlen
    monkeypatch.setattr(attn_ops, "attention_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hf16 = Gemma4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    model = build(tmp_path, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf32(input_ids=ids).logits
        hf_err = rel_err(hf16(input_ids=ids.cuda()).logits.cpu(), ref)
    ours = our_logits(model, ids.cuda()).cpu()
    assert len(calls) == cfg["num_hidden_layers"], calls
    assert rel_err(ours, ref) <= 2 * hf_err + 1e-3, (rel_err(ours, ref), hf_err)
