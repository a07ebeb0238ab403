"""Gemma4Runtime: load a checkpoint, then score prompts or generate from a batch of them.

One ``generate`` call runs a small loop of ``step()``s (nano-vllm style): a step either
prefills the sequences that have not started (one forward per prompt, writing its KV into
its slot) or decodes one token for every running sequence in a single batched forward.
Every sequence stops on its own (EOS / stop ids / max_new_tokens). On CUDA the decode
forward is replayed from CUDA graphs (``cuda_graph.py``). Model quirks stay in the model:
the runtime only reads ``kv_cache_spec()`` and calls ``forward``.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma4x.chat import (
    TOOL_RESPONSE_OPEN,
    TURN_CLOSE,
    ChatTemplateError,
    ToolCall,
    load_chat_template,
    load_special_tokens,
    parse_tool_calls,
    render_chat,
    split_reasoning,
    strip_control_tokens,
)
from gemma4x.config import ModelConfig, load_config, nvfp4_quant_config, with_quantization
from gemma4x.models.text import Gemma4TextModel
from gemma4x.runtime.kv_cache import KVCache
from gemma4x.runtime.sampler import Sampler, SamplingParams


@dataclass
class GenerationResult:
    """One prompt's output: generated ids only (a final stop id included), text, why it ended."""

    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or a stop id) | "length" (max_new_tokens)


@dataclass
class ChatResult:
    """One conversation's answer: ``content`` without the thinking channel, tool calls and
    special tokens; ``reasoning`` the thinking channel (None without one); ``raw`` the decoded
    answer with its special tokens."""

    token_ids: list[int]
    content: str
    reasoning: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    raw: str


@dataclass
class _Sequence:
    """One prompt being generated: its slot, its tokens, and whether it is done."""

    slot: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def waiting(self) -> bool:  # not prefilled yet: every running sequence has sampled a token
        return not self.output

    @property
    def running(self) -> bool:
        return self.finish_reason is None

    def append(self, token: int, stops: frozenset[int]) -> None:
        self.output.append(token)
        if token in stops:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new_tokens:
            self.finish_reason = "length"


@dataclass
class _Batch:
    """The sequences of one generate() call and how they pick and stop tokens."""

    seqs: list[_Sequence]
    sampler: Sampler
    stops: frozenset[int]

    @property
    def done(self) -> bool:
        return not any(s.running for s in self.seqs)


# from_pretrained(quantize=...) -> the NVFP4 scope quantized at load (config.nvfp4_quant_config).
QUANTIZE_MODES = {"nvfp4": "experts", "nvfp4-all": "all"}


def _read_generation_config(path: Path) -> dict:
    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    with open(f, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return doc


def _id_list(value, what: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{what} must be an int or a list of ints, got {value!r}")
    return tuple(ids)


def _strip_end(raw: str, tokenizer, ids: list[int], stops: set[int]) -> str:
    """``raw`` without the text of its final stop token."""
    if ids and ids[-1] in stops:
        tail = tokenizer.decode([ids[-1]], skip_special_tokens=False)
        if tail and raw.endswith(tail):
            return raw[: -len(tail)]
    return raw


class Gemma4Runtime:
    def __init__(
        self,
        model: Gemma4TextModel,
        config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int,
        max_seq_len: int,
        tokenizer=None,
        eos_token_ids: Sequence[int] = (),
        suppress_tokens: Sequence[int] = (),
        use_cuda_graphs: bool | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.model = model.eval()
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size = config.text.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.suppress_tokens = tuple(t for t in suppress_tokens if 0 <= t < self.vocab_size)
        self._suppress = torch.tensor(self.suppress_tokens, device=device, dtype=torch.long)
        if device.type == "cuda":
            model.fuse_projections_()  # one GEMM for q/k/v and one for gate/up per layer
            model.pack_nvfp4_()  # NVFP4 weights held once, in the SM90 kernels' layout (before graph capture)
        self.cache = KVCache(
            model.kv_cache_spec(), num_slots=max_batch_size, max_seq_len=max_seq_len, device=device, dtype=dtype
        )
        if use_cuda_graphs is None:
            use_cuda_graphs = device.type == "cuda"
        if use_cuda_graphs and device.type != "cuda":
            raise ValueError(f"use_cuda_graphs needs a CUDA device, got {device}")
        self.graphs = None
        if use_cuda_graphs:
            from gemma4x.runtime.cuda_graph import CudaGraphDecoder

            self.graphs = CudaGraphDecoder(model, self.cache, max_batch_size=max_batch_size, max_seq_len=max_seq_len)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 8,
        max_seq_len: int = 4096,
        use_cuda_graphs: bool | None = None,
        quantize: str | None = None,
    ) -> Gemma4Runtime:
        """Load a checkpoint directory (config.json, safetensors, optional tokenizer.json).

        ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU. ``use_cuda_graphs``
        (default: on for CUDA) replays decode steps from captured CUDA graphs.

        NVFP4: a ModelOpt NVFP4 export (``hf_quant_config.json`` or ``config.json:
        quantization_config``) loads as it is; its excluded modules stay in ``dtype``.
        ``quantize`` quantizes a BF16 checkpoint while loading, weight-only, with the
        reference quantizer on ``device``: ``"nvfp4"`` the routed experts (as the released
        26B-A4B NVFP4 checkpoint), ``"nvfp4-all"`` every linear of the decoder (attention,
        MLP, experts, per-layer-embedding projections; router, embeddings and LM head stay
        in ``dtype``). ``runtime.config.quantization`` then describes the result.
        """
        from gemma4x.loader import load_checkpoint

        path = Path(path)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be None or one of {sorted(QUANTIZE_MODES)}, got {quantize!r}")
        config = load_config(path)
        quant = None
        if quantize is not None:
            if config.quantization is not None:
                raise ValueError(
                    f"quantize={quantize!r}: {path} is already quantized ({config.quantization.quant_algo}, "
                    f"from {config.quantization.source}); load it without quantize="
                )
            quant = nvfp4_quant_config(config, QUANTIZE_MODES[quantize])
        with torch.device("meta"):
            model = Gemma4TextModel(config.text, config.mm_placeholder_token_ids)
        prefix = config.weight_prefix
        ignore = model.ignored_checkpoint_keys(prefix)
        load_checkpoint(model, path, prefix=prefix, device=device, dtype=dtype, ignore_patterns=ignore)
        if quant is not None:
            model.quantize_(quant)
            config = with_quantization(config, quant)

        gen = _read_generation_config(path)
        eos = _id_list(gen.get("eos_token_id"), "generation_config.json eos_token_id") or config.text.eos_token_ids
        suppress = _id_list(gen.get("suppress_tokens"), "generation_config.json suppress_tokens")
        # Token-id prompts must work without the optional `tokenizers` package.
        from gemma4x.tokenizer import optional_tokenizer

        tokenizer = optional_tokenizer(path, bos_id=config.text.bos_token_id)
        return cls(
            model,
            config,
            device=device,
            dtype=dtype,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            tokenizer=tokenizer,
            eos_token_ids=eos,
            suppress_tokens=suppress,
            use_cuda_graphs=use_cuda_graphs,
            chat_template=load_chat_template(path),
            special_tokens=load_special_tokens(path),
        )

    # ---- input checks (before any state changes, so a bad call leaves the runtime usable) ----

    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError(
                f"prompts must be a list of prompts (token-id lists or strings), got {type(prompts).__name__}"
            )
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(
                        f"prompt {i} is text but no tokenizer is loaded (no tokenizer.json, or the `tokenizers` "
                        "package is not installed: pip install tokenizers); pass token ids"
                    )
                ids = self.tokenizer.encode(p)
            elif isinstance(p, torch.Tensor):
                ids = p.reshape(-1).tolist()
            elif isinstance(p, Sequence) and not isinstance(p, bytes):
                ids = list(p)
            else:
                raise ValueError(f"prompt {i} must be a list of token ids or a string, got {type(p).__name__}")
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
            for j, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise ValueError(f"prompt {i} token {j} is {t!r}, not an integer token id")
                if not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt {i} token {j} has id {t}, outside the vocabulary [0, {self.vocab_size})")
            out.append([int(t) for t in ids])
        return out

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int | None) -> None:
        """Each prompt (plus ``max_new_tokens`` when generating) must fit in ``max_seq_len``."""
        for i, p in enumerate(prompts):
            if max_new_tokens is None and len(p) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens > max_seq_len={self.max_seq_len}")
            if max_new_tokens is not None and len(p) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(p) + max_new_tokens} > max_seq_len={self.max_seq_len}"
                )

    # ---- scoring ----

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per prompt, fp32 soft-capped logits ``[len, vocab]`` (on the CPU), equal to HF's forward."""
        prompts = self._encode(token_ids)
        self._check_lengths(prompts, None)
        out = []
        for ids in prompts:
            x = torch.tensor([ids], device=self.device)
            pos = torch.arange(len(ids), device=self.device)[None]
            out.append(self.model.compute_logits(self.model(x, pos))[0].cpu())
        return out

    # ---- generation ----

    @torch.inference_mode()
    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """Generate a continuation for each prompt; each sequence stops on its own.

        Args:
            prompts: token-id lists, or strings when the checkpoint has a tokenizer.json
                (encoded with one leading BOS). At most ``max_batch_size`` of them.
            max_new_tokens: per sequence; ``len(prompt) + max_new_tokens <= max_seq_len``.
            temperature: 0 = greedy (argmax, first index on ties); else sampling with
                ``top_k`` / ``top_p`` applied after the temperature, as HF orders them.
            seed: seeds the sampling generator: same seed and inputs, same tokens.
            stop_token_ids: extra stop ids beside the EOS ids of generation_config.json.

        Returns:
            One GenerationResult per prompt: the generated ids (a final stop id included,
            as HF returns it), their text (None without a tokenizer) and the finish reason
            ("stop" or "length"). ``suppress_tokens`` of generation_config.json are never sampled.

        Raises:
            ValueError: naming the prompt and value for an empty prompt, an id outside the
                vocabulary, a prompt too long for ``max_seq_len``, too many prompts, or bad
                sampling arguments. Nothing has run then, and the runtime stays usable.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params = SamplingParams(temperature, top_k, top_p)
        stops = set(self.eos_token_ids) | set(_id_list(stop_token_ids, "stop_token_ids"))
        ids = self._encode(prompts)
        if not ids:
            return []
        if len(ids) > self.max_batch_size:
            raise ValueError(f"batch of {len(ids)} prompts exceeds max_batch_size={self.max_batch_size}")
        self._check_lengths(ids, max_new_tokens)

        batch = _Batch(
            seqs=[_Sequence(slot=i, prompt=p, max_new_tokens=max_new_tokens) for i, p in enumerate(ids)],
            sampler=Sampler(params, seed=seed, device=self.device),
            stops=frozenset(stops),
        )
        while not batch.done:
            self.step(batch)
        return [
            GenerationResult(
                token_ids=s.output,
                text=self.tokenizer.decode(s.output) if self.tokenizer is not None else None,
                finish_reason=s.finish_reason,
            )
            for s in batch.seqs
        ]

    def chat(
        self,
        conversations: Sequence[Sequence[dict]],
        max_new_tokens: int = 256,
        *,
        enable_thinking: bool = False,
        tools: Sequence[dict] | None = None,
        **sampling,
    ) -> list[ChatResult]:
        """Answer each conversation with the checkpoint's chat template.

        Args:
            conversations: one list of ``{"role": ..., "content": ...}`` messages per
                conversation (roles system / user / assistant / tool, as the template takes them).
            enable_thinking: let the model think first (the template's ``enable_thinking``); the
                thinking comes back in ``reasoning``.
            tools: JSON-schema tool declarations; the model's calls come back in ``tool_calls``,
                and ``<|tool_response>`` (which the model writes after a call) stops the turn. A
                call whose arguments do not parse stays in ``content`` (and ``raw``).
            sampling: ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_token_ids`` as in
                :meth:`generate`. The turn's end (``<turn|>``) is a stop token.

        Raises:
            ChatTemplateError: no chat template or tokenizer in the checkpoint, a malformed
                conversation, or an error the template raised. Nothing has run then.
        """
        if self.chat_template is None:
            raise ChatTemplateError(
                "this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); "
                "use generate() with a formatted prompt"
            )
        if self.tokenizer is None:
            raise ChatTemplateError(
                "chat needs the checkpoint's tokenizer (tokenizer.json and the `tokenizers` package: pip install tokenizers)"
            )
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
            raise ChatTemplateError(
                f"conversations must be a list of conversations (each a list of messages), got {type(conversations).__name__}"
            )
        prompts = []
        for i, messages in enumerate(conversations):
            try:
                text = render_chat(
                    self.chat_template, messages, add_generation_prompt=True, tools=tools,
                    special_tokens=self.special_tokens, enable_thinking=enable_thinking,
                )  # fmt: skip
            except ChatTemplateError as exc:
                raise ChatTemplateError(f"conversation {i}: {exc}") from None
            prompts.append(self.tokenizer.encode(text, add_bos=False))  # the template wrote <bos>
        turn_ends = [TURN_CLOSE, TOOL_RESPONSE_OPEN] if tools else [TURN_CLOSE]
        stops = list(sampling.pop("stop_token_ids", None) or ())
        stops += [t for t in map(self.tokenizer.token_id, turn_ends) if t is not None]
        results = self.generate(prompts, max_new_tokens, stop_token_ids=stops, **sampling)
        all_stops = set(stops) | set(self.eos_token_ids)
        out = []
        for r in results:
            raw = self.tokenizer.decode(r.token_ids, skip_special_tokens=False)
            reasoning, rest = split_reasoning(_strip_end(raw, self.tokenizer, r.token_ids, all_stops))
            try:
                content, calls = parse_tool_calls(rest)
            except ValueError:  # the model wrote a malformed call: keep its text (``raw`` has it all)
                content, calls = rest, []
            out.append(ChatResult(r.token_ids, strip_control_tokens(content or "").strip(), reasoning, calls,
                                  r.finish_reason, raw))
        return out

    def step(self, batch: _Batch) -> None:
        """Prefill the sequences that have not started, else decode one token for all running ones."""
        todo = [s for s in batch.seqs if s.waiting]
        if todo:
            logits = torch.cat([self._prefill(s) for s in todo])
        elif self.graphs is not None:
            logits = self._decode_graph(batch.seqs)
            todo = [s for s in batch.seqs if s.running]
            if len(todo) < len(batch.seqs):
                logits = logits[[s.slot for s in todo]]
        else:
            todo = [s for s in batch.seqs if s.running]
            logits = self._decode(todo)
        if len(self._suppress):
            logits[:, self._suppress] = float("-inf")
        tokens = batch.sampler(logits).tolist()  # the one host sync per step: stops are decided here
        for s, t in zip(todo, tokens):
            s.append(t, batch.stops)

    def _prefill(self, s: _Sequence) -> torch.Tensor:
        """Run a whole prompt into its slot; returns the last position's logits ``[1, V]``."""
        T = len(s.prompt)
        x = torch.tensor([s.prompt], device=self.device)
        pos = torch.arange(T, device=self.device)[None]
        h = self.model(x, pos, self.cache.prefill_view(s.slot), last_only=True)
        return self.model.compute_logits(h[:, -1])

    def _decode(self, batch: list[_Sequence]) -> torch.Tensor:
        """One token for each sequence of ``batch`` (the last sampled one is not cached yet)."""
        last = [s.output[-1] for s in batch]
        positions = [s.num_tokens - 1 for s in batch]
        x = torch.tensor(last, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        view = self.cache.decode_view([s.slot for s in batch], kv_len=max(positions) + 1)
        h = self.model(x, pos, view)
        return self.model.compute_logits(h[:, -1])

    def _decode_graph(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Graph replay over every sequence of the call (row i = slot i); finished rows
        recompute their last token in place and are ignored."""
        last = [s.output[-1] for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        return self.graphs(last, positions)
