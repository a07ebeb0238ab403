"""The runtime's CUDA decode path runs the decode-attention kernel (eager and graph replay).

The tiny configs of gemma4_tiny with kernel-sized heads (64 sliding, 128 full): greedy tokens
agree with HF bf16 generate, graph replay agrees with the eager path, and the kernel, not the
SDPA fallback, served every decode-step attention (KV-shared layers included).
"""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma4_tiny as gt  # noqa: E402

from gemma4x import Gemma4Runtime  # noqa: E402

pytestmark = pytest.mark.cuda
pytest.importorskip("transformers")

STEPS = 24


def _wide(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_config", cfg)
    text.update(head_dim=64, global_head_dim=128)
    return cfg


def _prompts(lengths=(3, 11, 20, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ("dense", "moe_kv_eq", "e2b_like"):
        path = tmp_path_factory.mktemp(name)
        cfg = _wide(gt.CONFIGS[name])
        gt.make_checkpoint(cfg, path, seed=3)
        out[name] = (path, cfg)
    return out


@pytest.mark.parametrize("name", ["dense", "moe_kv_eq", "e2b_like"])
def test_decode_kernel_serves_runtime(checkpoints, name, monkeypatch):
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    # The package exports the op under the module's name: fetch the module itself.
    mod = importlib.import_module("gemma4x.ops.attention_decode")
    calls = []
    real = mod.attention_decode

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(mod, "attention_decode", spy)
    path, cfg = checkpoints[name]
    kw = dict(device="cuda", dtype=torch.bfloat16, max_batch_size=4, max_seq_len=64)
    eager = Gemma4Runtime.from_pretrained(path, use_cuda_graphs=False, **kw)
    prompts = _prompts()
    a = eager.generate(prompts, max_new_tokens=STEPS)
    n_layers = len(eager.model.layers)
    assert calls and len(calls) % n_layers == 0, "decode steps did not run the kernel on every layer"

    graphs = Gemma4Runtime.from_pretrained(path, use_cuda_graphs=True, **kw)
    b = graphs.generate(prompts, max_new_tokens=STEPS)
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra.token_ids, rb.token_ids))
    assert same / (STEPS * len(prompts)) >= 0.95

    cls = Gemma4ForCausalLM if cfg["model_type"] == "gemma4_text" else Gemma4ForConditionalGeneration
    hf = cls.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    agree = total = 0
    for p, r in zip(prompts, b):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=STEPS)
        ref = ref[0, len(p) :].tolist()
        agree += sum(x == y for x, y in zip(ref, r.token_ids))
        total += max(len(ref), len(r.token_ids))
    assert agree / total >= 0.95, (agree, total)
