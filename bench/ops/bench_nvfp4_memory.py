"""GPU memory of the 26B-A4B NVFP4 routed experts: before and after holding them once (W4A16-packed).

One ``NVFP4Experts`` of real shape (E=128, H=2816, I=704; random weights quantized on the GPU
by ``from_experts``). Measured with the bytes the live tensors requested
(``torch.cuda.memory_stats()["requested_bytes.all.current"]``; ``memory_allocated`` beside it
counts the caching allocator's blocks, up to 1 MiB more per large tensor):

* checkpoint layout only (what the loader builds);
* the old steady state: the checkpoint layout plus the W4A16 copy the old ``w4a16_packed()``
  cached on the first SM90 forward (rebuilt here the same way: a ``torch.stack`` of per-expert
  ``w4a16_pack``);
* after ``pack_w4a16_()`` (what ``Gemma4Runtime`` now does at construction): the packed copy
  only; and the peak during packing, and its time.

It then checks that decode (T=1, 4) and prefill (T=512) outputs are bit-identical between the
old cache and the packed layer, and that ``state_dict()`` is bit-identical, and scales the
per-layer bytes to the model's 30 MoE layers. The inputs and outputs of that check are live
during packing; they are subtracted from the "after" figures.

    python bench/ops/bench_nvfp4_memory.py          (JSON to $OUT/bench_nvfp4_memory.json if OUT is set)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gemma4x.layers.moe import Experts, NVFP4Experts
from gemma4x.ops.nvfp4 import w4a16_moe_experts
from gemma4x.reference.nvfp4_w4a16 import w4a16_pack

E, TOPK, H, I = 128, 8, 2816, 704
LAYERS = 30  # 26B-A4B: every decoder layer has the routed experts
MIB = 2**20


def allocated() -> int:
    """Bytes the live tensors requested (no allocator block rounding)."""
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["requested_bytes.all.current"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
    )


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    with dev:
        bf = Experts(E, H, I).bfloat16()
    bf.gate_up_proj.normal_(std=2 * H**-0.5)
    bf.down_proj.normal_(std=I**-0.5)
    q = NVFP4Experts.from_experts(bf)
    del bf
    torch.cuda.empty_cache()

    names = ("gate_up_weight", "gate_up_weight_scale", "down_weight", "down_weight_scale")
    ckpt = sum(getattr(q, n).numel() * getattr(q, n).element_size() for n in names)
    m_ckpt = allocated()
    sd0 = {k: v.cpu() for k, v in q.state_dict().items()}

    # the old steady state: the checkpoint tensors + the cache the old w4a16_packed() kept
    old_gu = torch.stack(
        [w4a16_pack(q.gate_up_weight[e], q.gate_up_weight_scale[e], interleave_gate_up=True) for e in range(E)]
    )
    old_dn = torch.stack([w4a16_pack(q.down_weight[e], q.down_weight_scale[e]) for e in range(E)])
    m_old = allocated()
    packed_bytes = (old_gu.numel() + old_dn.numel()) * old_gu.element_size()

    g = torch.Generator(device=dev).manual_seed(1)
    cases = []
    for T in (1, 4, 512):
        idx = torch.rand(T, E, generator=g, device=dev).topk(TOPK, dim=-1).indices
        w = torch.rand(T, TOPK, generator=g, device=dev) + 0.1
        cases.append((T, torch.randn(T, H, generator=g, device=dev).bfloat16(), w, idx))
    s_gu, s_dn = q.gate_up_weight_scale_2, q.down_weight_scale_2
    want = [w4a16_moe_experts(x, idx, w, old_gu, s_gu, old_dn, s_dn) for _, x, w, idx in cases]
    del old_gu, old_dn
    m_base = allocated()  # the checkpoint layout + the check's inputs and outputs
    io = m_base - m_ckpt

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    freed = q.pack_w4a16_()
    torch.cuda.synchronize()
    pack_s = time.perf_counter() - t0
    peak = torch.cuda.memory_stats()["requested_bytes.all.peak"] - m_base
    m_new = allocated() - io
    torch_allocated_new = torch.cuda.memory_allocated()
    got = [q(x, w, idx) for _, x, w, idx in cases]
    identical = all(torch.equal(a, b) for a, b in zip(got, want))
    del got
    m_after_fwd = allocated() - io
    sd1 = q.state_dict()
    state_identical = list(sd1) == list(sd0) and all(same_bits(sd1[k].cpu(), sd0[k]) for k in sd0)
    del sd1

    res = {
        "device": torch.cuda.get_device_name(),
        "shape": {"E": E, "H": H, "I": I},
        "checkpoint_layout_bytes": ckpt,
        "w4a16_packed_bytes": packed_bytes,
        "requested_checkpoint_only_mib": m_ckpt / MIB,
        "requested_old_both_copies_mib": m_old / MIB,
        "requested_after_pack_mib": m_new / MIB,
        "requested_after_forwards_mib": m_after_fwd / MIB,
        "check_inputs_outputs_mib": io / MIB,
        "memory_allocated_after_pack_mib_incl_io": torch_allocated_new / MIB,
        "freed_by_pack_bytes": freed,
        "pack_peak_above_checkpoint_mib": peak / MIB,
        "pack_seconds": pack_s,
        "outputs_bit_identical": identical,
        "state_dict_bit_identical": state_identical,
        "per_layer_saving_mib": (m_old - m_new) / MIB,
        "model_saving_gib_30_layers": LAYERS * (m_old - m_new) / 2**30,
    }
    print(f"26B-A4B routed experts, one layer (E={E}, H={H}, I={I}) on {res['device']}")
    print(f"  checkpoint layout {ckpt / MIB:.1f} MiB, W4A16 packed {packed_bytes / MIB:.1f} MiB")
    print(f"  live tensors: checkpoint only {m_ckpt / MIB:.1f} MiB | old (both copies) {m_old / MIB:.1f} MiB"
          f" | after pack_w4a16_() {m_new / MIB:.1f} MiB | after forwards {m_after_fwd / MIB:.1f} MiB")
    print(f"  saving per layer {(m_old - m_new) / MIB:.1f} MiB; x{LAYERS} layers {res['model_saving_gib_30_layers']:.2f} GiB")
    print(f"  pack: {pack_s * 1e3:.0f} ms, peak {peak / MIB:.1f} MiB above the checkpoint layout"
          f" (inputs/outputs of the check, {io / MIB:.1f} MiB, subtracted above)")
    print(f"  outputs (T=1, 4, 512) bit-identical: {identical}; state_dict bit-identical: {state_identical}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_nvfp4_memory.json"), "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
