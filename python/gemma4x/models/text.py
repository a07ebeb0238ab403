"""Gemma 4 text decoder: decoder layer and model assembly (spec §2).

Parameter names equal the checkpoint's tensor names after the text weight prefix
(``layers.3.self_attn.q_proj.weight``, ``layers.3.experts.gate_up_proj``,
``layers.3.layer_scalar``, ``embed_tokens.weight``, ...), so the generic loader maps keys
1:1. The forward of one decoder layer (spec §2.9)::

    a  = post_attention_norm(attn(input_norm(h)))
    h1 = h + a
    m  = mlp(pre_ff_norm(h1))
    if MoE: m = post_ff_norm_1(m) + post_ff_norm_2(experts(pre_ff_norm_2(h1), router(h1)))
    h2 = h1 + post_ff_norm(m)
    if PLE: h2 = h2 + post_pli_norm(proj(gelu_tanh(gate(h2)) * PLI[:, :, l]))
    out = h2 * layer_scalar

Model: ``h = embed(ids) * sqrt(H)``; layers; ``logits = softcap(norm(h) @ E^T)`` with the
LM head tied to the unscaled embedding table.

NVFP4: the modules in ``cfg.nvfp4_modules`` (from a ModelOpt export's quantization config)
are built as ``NVFP4Linear`` / ``NVFP4Experts``, whose parameters load the checkpoint's
quantized tensors; ``quantize_`` converts a loaded BF16 model instead (quantize at load).
On an SM90 GPU ``pack_nvfp4_`` (called by ``Gemma4Runtime``) keeps their weights only in the
W4A16 kernels' layout (:mod:`gemma4x.layers.nvfp4_storage`).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from gemma4x.config import QuantConfig, TextConfig
from gemma4x.layers.attention import KV, Attention, KVStore, LayerCacheSpec, NoCache, SelfKV
from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.embedding import ScaledEmbedding, per_layer_inputs
from gemma4x.layers.linear import NVFP4Linear, make_linear
from gemma4x.layers.mlp import GegluMLP
from gemma4x.layers.moe import Experts, NVFP4Experts, Router
from gemma4x.layers.norm import RMSNorm
from gemma4x.layers.nvfp4_storage import W4A16Storage
from gemma4x.layers.rotary import RotaryEmbedding
from gemma4x.reference.quant import nvfp4_global_scale


def _call(module: nn.Module, native: bool):
    return module.forward_native if native else module


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer = layer
        self.eps = eps
        q = f"layers.{layer}."
        quant = {"input_scale": cfg.nvfp4_input_scales, "group_size": cfg.nvfp4_group_size}
        self.self_attn = Attention(cfg, layer)
        mlp_nvfp4 = {p for p in ("gate_proj", "up_proj", "down_proj") if cfg.is_nvfp4(f"{q}mlp.{p}")}
        self.mlp = GegluMLP(H, cfg.intermediate_sizes[layer], nvfp4=mlp_nvfp4, **quant)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        # A checkpoint tensor [1] (persistent buffer in HF), multiplies the layer output.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.has_ple = cfg.has_ple
        if self.has_ple:
            P = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = make_linear(H, P, nvfp4=cfg.is_nvfp4(f"{q}per_layer_input_gate"), **quant)
            self.per_layer_projection = make_linear(P, H, nvfp4=cfg.is_nvfp4(f"{q}per_layer_projection"), **quant)
            self.post_per_layer_input_norm = RMSNorm(H, eps)
        self.has_moe = cfg.enable_moe_block
        if self.has_moe:
            self.router = Router(H, cfg.num_experts, cfg.top_k_experts, eps)
            if cfg.is_nvfp4(f"{q}experts"):
                self.experts = NVFP4Experts(cfg.num_experts, H, cfg.moe_intermediate_size, **quant)
            else:
                self.experts = Experts(cfg.num_experts, H, cfg.moe_intermediate_size)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)

    def _run(
        self,
        h: torch.Tensor,
        pli: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        kv: KVStore,
        shared: KV | None,
        native: bool,
    ) -> tuple[torch.Tensor, KV]:
        ops = ops_for(h, native)
        eps = self.eps
        a = ops.rms_norm(h, self.input_layernorm.weight, eps)
        a, keys = _call(self.self_attn, native)(a, cos, sin, positions, kv, shared)
        a = ops.rms_norm(a, self.post_attention_layernorm.weight, eps)
        # h becomes h1 = h + a (rounded to the dtype, in place); m = pre_ff_norm(h1).
        m = ops.fused_add_rms_norm(a, h, self.pre_feedforward_layernorm.weight, eps)
        m = _call(self.mlp, native)(m)
        if self.has_moe:
            flat = h.reshape(-1, h.shape[-1])
            weights, idx = _call(self.router, native)(flat)  # routed on h1, not on the normed input
            x2 = ops.rms_norm(flat, self.pre_feedforward_layernorm_2.weight, eps)
            e = _call(self.experts, native)(x2, weights, idx).view_as(h)
            if not self.has_ple:
                # (post_ff(post_ff_1(m) + post_ff_2(e)) + h1) * layer_scalar in one op.
                out = ops.moe_tail_norm(
                    m, e, h,
                    self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight,
                    self.post_feedforward_layernorm.weight, self.layer_scalar, eps, eps, eps,
                )  # fmt: skip
                return out, keys
            m = ops.rms_norm(m, self.post_feedforward_layernorm_1.weight, eps) + ops.rms_norm(
                e, self.post_feedforward_layernorm_2.weight, eps
            )
        # residual_rms_norm(r, x, w, eps, s) = (r + rms_w(x)) [* s], rounded as the separate ops.
        if not self.has_ple:
            out = ops.residual_rms_norm(h, m, self.post_feedforward_layernorm.weight, eps, self.layer_scalar)
            return out, keys
        h = ops.residual_rms_norm(h, m, self.post_feedforward_layernorm.weight, eps)
        g = ops.geglu(self.per_layer_input_gate(h), pli)  # gelu_tanh(gate(h2)) * PLI[:, :, l]
        out = ops.residual_rms_norm(
            h, self.per_layer_projection(g), self.post_per_layer_input_norm.weight, eps, self.layer_scalar
        )
        return out, keys

    def forward(self, h, pli, cos, sin, positions, kv: KVStore, shared: KV | None = None) -> tuple[torch.Tensor, KV]:
        """``h [B, T, H]`` (consumed: updated in place) -> (layer output, the K/V attended over)."""
        return self._run(h, pli, cos, sin, positions, kv, shared, native=False)

    def forward_native(self, h, pli, cos, sin, positions, kv: KVStore, shared: KV | None = None):
        return self._run(h, pli, cos, sin, positions, kv, shared, native=True)


class Gemma4TextModel(nn.Module):
    """The Gemma 4 text decoder with its tied, soft-capped LM head."""

    def __init__(self, cfg: TextConfig, mm_placeholder_token_ids: tuple[int, ...] = ()):
        super().__init__()
        self.config = cfg
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        # gemma4 (multimodal) checkpoints map image/video/audio placeholders to pad for the
        # text embeddings and PLE when no tower output replaces them (spec §2.12, §3).
        self.mm_placeholder_token_ids = tuple(mm_placeholder_token_ids)
        self._mm_ids_by_device: dict[torch.device, torch.Tensor] = {}
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, H)
        if cfg.has_ple:
            P = cfg.hidden_size_per_layer_input
            self.embed_tokens_per_layer = ScaledEmbedding(cfg.vocab_size_per_layer_input, L * P, scale_dim=P)
            self.per_layer_model_projection = make_linear(
                H, L * P, nvfp4=cfg.is_nvfp4("per_layer_model_projection"),
                input_scale=cfg.nvfp4_input_scales, group_size=cfg.nvfp4_group_size,
            )  # fmt: skip
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        # One rotary table per (layer type, head dim); they hold no parameters.
        self._rope_key = [(t, cfg.head_dims[i]) for i, t in enumerate(cfg.layer_types)]
        self.rotary = nn.ModuleDict(
            {f"{t}_{d}": RotaryEmbedding(d, cfg.rope[t]) for t, d in sorted(set(self._rope_key))}
        )

    # ---- loading contract ------------------------------------------------------------

    def ignored_checkpoint_keys(self, prefix: str) -> list[str]:
        """Regexes (``re.search`` on full checkpoint keys) of tensors this model does not use.

        K/V weights of KV-shared layers (HF ignores them too), the tied ``lm_head.weight``,
        everything outside ``prefix`` (vision/audio towers of a gemma4 checkpoint), and the
        FP8 KV-cache scales of a ModelOpt export that has them (our cache keeps the model dtype).
        """
        pre = re.escape(prefix)
        pats = [rf"^(?!{pre})", r"^lm_head\.weight$"]
        for i, mode in enumerate(self.config.kv_sharing):
            if mode == "reuse":
                pats.append(rf"^{pre}layers\.{i}\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
        if self.config.kv_cache_quant_algo is not None:
            pats.append(rf"^{pre}layers\.\d+\.self_attn\.(k_proj\.k_scale|v_proj\.v_scale)$")
        return pats

    def kv_cache_spec(self) -> list[LayerCacheSpec]:
        """Per layer: the cache it needs (full / sliding ring of `window` entries / none)."""
        cfg = self.config
        specs = []
        for i in range(cfg.num_hidden_layers):
            nkv, d = cfg.num_kv_heads[i], cfg.head_dims[i]
            src = cfg.kv_source_layer[i]
            if cfg.kv_sharing[i] == "reuse":
                specs.append(LayerCacheSpec("none", nkv, d, None, src))
                continue
            left, _ = cfg.attention_window(i)
            if left is None:
                specs.append(LayerCacheSpec("full", nkv, d, None, i))
            else:
                specs.append(LayerCacheSpec("sliding", nkv, d, left + 1, i))
        return specs

    # ---- quantization at load --------------------------------------------------------

    @torch.no_grad()
    def quantize_(self, quant: QuantConfig) -> None:
        """Quantize the loaded BF16 modules named in ``quant.modules`` to NVFP4, in place.

        Runs the reference quantizer (:mod:`gemma4x.reference.quant`) on the model's device,
        one module group at a time, each BF16 weight freed as it is replaced. Linears that
        read one input share a ``weight_scale_2`` as in a ModelOpt export: attention q/k/v,
        MLP gate/up, and (inside ``NVFP4Experts``) each expert's gate/up. Weight-only: no
        ``input_scale``. Afterwards ``self.config.nvfp4_modules`` lists what is NVFP4.
        """
        already = sorted(self.config.nvfp4_modules)
        if already:
            raise ValueError(f"the model is already NVFP4 ({len(already)} modules, e.g. {already[0]!r})")
        groups: dict[str, list[str]] = {}
        for name in sorted(quant.modules):
            parent, _, leaf = name.rpartition(".")
            key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
            groups.setdefault(f"{parent}.{key.get(leaf, leaf)}", []).append(name)
        for names in groups.values():
            mods = [self.get_submodule(n) for n in names]
            if isinstance(mods[0], Experts):
                new = [NVFP4Experts.from_experts(mods[0])]
            else:
                g = nvfp4_global_scale(torch.stack([m.weight.abs().amax().float() for m in mods]).amax())
                new = [NVFP4Linear.from_linear(m, g) for m in mods]
            for n, m in zip(names, new):
                parent, _, leaf = n.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, leaf, m)
        self.config = dataclasses.replace(
            self.config, nvfp4_modules=quant.modules, nvfp4_group_size=quant.group_size, nvfp4_input_scales=False
        )

    def pack_nvfp4_(self) -> int:
        """Hold each NVFP4 module's weights only in the W4A16 layout of the SM90 kernels.

        Module by module (:meth:`W4A16Storage.pack_w4a16_`): each drops its checkpoint-layout
        tensors once their packed copy exists, so at most one module holds both. Nothing happens
        where the kernels do not run (CPU, other GPUs). Call it before capturing CUDA graphs.
        Returns the bytes of checkpoint-layout tensors dropped.
        """
        return sum(m.pack_w4a16_() for m in self.modules() if isinstance(m, W4A16Storage))

    def fuse_projections_(self) -> int:
        """Let each layer compute q/k/v and the MLP's gate/up as one GEMM each on the GPU path.

        Weights stay where they are (each projection's weight becomes a view of the fused
        storage), so memory does not grow and ``forward_native`` is unchanged; NVFP4 projections
        are left as they are. Returns how many groups were fused.
        """
        fused = 0
        for layer in self.layers:
            fused += layer.self_attn.fuse_projections_()
            fused += layer.mlp.fuse_projections_()
        return fused

    # ---- forward -----------------------------------------------------------------------

    def _mm_ids(self, device: torch.device) -> torch.Tensor:
        # Built once per device, not per forward: no host->device copy in the decode loop.
        if device not in self._mm_ids_by_device:
            self._mm_ids_by_device[device] = torch.tensor(self.mm_placeholder_token_ids, device=device)
        return self._mm_ids_by_device[device]

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVStore | None,
        last_only: bool,
        native: bool,
    ) -> torch.Tensor:
        cfg = self.config
        kv = NoCache() if kv is None else kv
        ids = input_ids
        if self.mm_placeholder_token_ids:
            ids = ids.masked_fill(torch.isin(ids, self._mm_ids(ids.device)), cfg.pad_token_id)
        h = self.embed_tokens(ids)
        pli = None
        if cfg.has_ple:
            pli = per_layer_inputs(
                h,
                self.embed_tokens_per_layer(ids),
                self.per_layer_model_projection,
                self.per_layer_projection_norm,
                cfg.num_hidden_layers,
                native,
            )
        rope = {key: self.rotary[f"{key[0]}_{key[1]}"].cos_sin(positions, h.dtype) for key in set(self._rope_key)}

        shared: dict[str, KV] = {}
        for i, layer in enumerate(self.layers):
            if last_only and i == cfg.first_kv_shared_layer and h.shape[1] > 1:
                # From here on no layer writes KV, so only the last position matters (HF does
                # the same in generate: _maybe_slice_kv_shared_inputs; numerically neutral).
                h, positions = h[:, -1:], positions[:, -1:]
                # The stored keys stay the whole prompt's: no longer the queries' own tokens.
                shared = {t: tuple(keys) if isinstance(keys, SelfKV) else keys for t, keys in shared.items()}
                pli = pli[:, -1:] if pli is not None else None
                rope = {k: (c[:, -1:], s[:, -1:]) for k, (c, s) in rope.items()}
            t = cfg.layer_types[i]
            cos, sin = rope[self._rope_key[i]]
            h, keys = _call(layer, native)(
                h,
                pli[:, :, i] if pli is not None else None,
                cos,
                sin,
                positions,
                kv,
                shared.get(t) if cfg.kv_sharing[i] == "reuse" else None,
            )
            if cfg.kv_sharing[i] == "store":
                shared[t] = keys
        if last_only:
            h = h[:, -1:]
        return _call(self.norm, native)(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVStore | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]`` (``[B, 1, H]`` with ``last_only``).

        Args:
            input_ids: ``[B, T]`` token ids.
            positions: ``[B, T]`` absolute positions (RoPE and masks).
            kv: the cache to write to and read from; None = attend over these tokens only.
            last_only: only the last position's hidden state is needed (prefill for generation).
        """
        return self._run(input_ids, positions, kv, last_only, native=False)

    def forward_native(self, input_ids, positions, kv: KVStore | None = None, *, last_only: bool = False):
        return self._run(input_ids, positions, kv, last_only, native=True)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``softcap(hidden @ E^T)``, rounded like HF: the cap runs in the model dtype."""
        logits = F.linear(hidden, self.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


__all__ = ["DecoderLayer", "Gemma4TextModel"]
