"""The fused layer tail (``ops.geglu``, ``ops.residual_rms_norm``) leaves the model's outputs unchanged.

GPU: tiny random Gemma 4 checkpoints (dense, MoE, PLE/E2B-like) in bf16; the CUDA forward's
logits with the fused ops must equal, bit for bit, those of the same forward with the ops
composed as before (``dispatch.unfused_tail``: ``gelu_tanh(gate) * up`` and
``residual + rms_norm(x)`` then ``* layer_scalar``), with and without fused gate/up projections,
for a prompt and for a single token. The fused ops must actually run (call counts per layer).
CPU: the native path still composes the reference ops (bitwise HF parity is tested in
tests/model/test_text_model.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemma4_tiny as gt  # noqa: E402

from gemma4x.layers import dispatch  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ("dense", "moe_kv_eq", "e2b_like"):
        path = tmp_path_factory.mktemp(f"tail_{name}")
        gt.make_checkpoint(gt.CONFIGS[name], path, seed=11)
        out[name] = path
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dense", "moe_kv_eq", "e2b_like"])
@pytest.mark.parametrize("fuse_projections", [False, True])
def test_cuda_logits_bit_identical_with_and_without_the_fusion(checkpoints, name, fuse_projections, monkeypatch):
    from test_text_model import build, our_logits

    model = build(checkpoints[name], device="cuda", dtype=torch.bfloat16)
    if fuse_projections:
        assert model.fuse_projections_() > 0
    cuda_ns = dispatch.ops_for(torch.empty(1, device="cuda"))
    assert cuda_ns is not dispatch.REFERENCE, "the extension is not built"
    calls = {"geglu": 0, "residual_rms_norm": 0}

    def counted(op_name):
        real = getattr(cuda_ns, op_name)

        def f(*a, **kw):
            calls[op_name] += 1
            return real(*a, **kw)

        return f

    fused_ns = SimpleNamespace(**{**vars(cuda_ns), **{k: counted(k) for k in calls}})
    unfused_ns = dispatch.unfused_tail(cuda_ns)
    cfg = model.config
    L = cfg.num_hidden_layers
    for ids in (
        torch.randint(3, 250, (2, 19), generator=torch.Generator().manual_seed(1)),
        torch.randint(3, 250, (3, 1), generator=torch.Generator().manual_seed(2)),
    ):
        ids = ids.cuda()
        monkeypatch.setattr(dispatch, "_CUDA", fused_ns)
        calls.update(geglu=0, residual_rms_norm=0)
        fused = our_logits(model, ids)
        # One geglu per MLP plus one per PLE layer; one tail op per dense layer (two with PLE),
        # none in MoE layers without PLE (moe_tail_norm).
        assert calls["geglu"] == L * (2 if cfg.has_ple else 1)
        want_tail = 0 if cfg.enable_moe_block and not cfg.has_ple else L * (2 if cfg.has_ple else 1)
        assert calls["residual_rms_norm"] == want_tail
        monkeypatch.setattr(dispatch, "_CUDA", unfused_ns)
        unfused = our_logits(model, ids)
        assert torch.equal(fused.view(torch.int32), unfused.view(torch.int32)), (
            (fused - unfused).abs().max().item()
        )


def test_native_path_uses_the_reference_tail(checkpoints):
    from test_text_model import build, our_logits

    model = build(checkpoints["e2b_like"])
    ids = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(3))
    want = our_logits(model, ids, native=True)
    assert torch.equal(our_logits(model, ids), want)  # CPU forward == forward_native
