"""Gemma4Runtime.generate against transformers' generate, plus sampling, stops and bad input.

Greedy decoding must reproduce HF ``generate(do_sample=False)`` token for token for 32
steps, for a batch of prompts of different lengths (some longer than the sliding window),
on every tiny config: dense, MoE with attention_k_eq_v, E2B-like (PLE + KV sharing +
double-wide MLP), and a non-default layer pattern.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma4_tiny as gt  # noqa: E402

from gemma4x import GenerationResult, Gemma4Runtime  # noqa: E402

pytest.importorskip("transformers")

STEPS = 32
PROMPT_LENGTHS = (3, 11, 20, 7)  # 11 and 20 exceed the sliding windows (6, 8)


def _prompts(seed: int = 1, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, cfg in gt.CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, gt.make_checkpoint(cfg, path, seed=2))
    return out


@pytest.fixture(scope="module")
def dense_rt(checkpoints):
    return Gemma4Runtime.from_pretrained(checkpoints["dense"][0], max_batch_size=4, max_seq_len=64)


def hf_greedy(hf, prompt: list[int], steps: int = STEPS) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps, min_new_tokens=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", sorted(gt.CONFIGS))
def test_greedy_matches_hf_generate(checkpoints, name):
    path, hf = checkpoints[name]
    rt = Gemma4Runtime.from_pretrained(path, max_batch_size=4, max_seq_len=64)
    prompts = _prompts()
    results = rt.generate(prompts, max_new_tokens=STEPS)
    for p, r in zip(prompts, results):
        assert isinstance(r, GenerationResult)
        ref = hf_greedy(hf, p)
        assert r.token_ids == ref, (name, len(p))
        assert r.finish_reason == ("stop" if len(ref) < STEPS else "length")
        assert r.text is None  # no tokenizer.json in these checkpoints


def _agreement(hf, rt, prompts, device="cpu") -> float:
    """Fraction of greedy steps where our token equals HF's (positions past either end count as misses)."""
    results = rt.generate(prompts, max_new_tokens=STEPS)
    agree = total = 0
    for p, r in zip(prompts, results):
        ids = torch.tensor([p], device=device)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=STEPS)
        ref = ref[0, len(p) :].tolist()
        agree += sum(a == b for a, b in zip(ref, r.token_ids))
        total += max(len(ref), len(r.token_ids))
    return agree / total


@pytest.mark.parametrize("name", ["moe_kv_eq", "e2b_like"])
def test_bf16_greedy_agrees_with_hf_bf16(checkpoints, name):
    """bf16 on CPU: >= 95% of greedy steps agree with HF bf16 (in practice all of them)."""
    from transformers import Gemma4ForConditionalGeneration

    path, _ = checkpoints[name]
    hf16 = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    rt = Gemma4Runtime.from_pretrained(path, dtype=torch.bfloat16, max_batch_size=4, max_seq_len=64)
    assert _agreement(hf16, rt, _prompts()) >= 0.95


def test_checkpoint_with_towers_loads_the_text_decoder(tmp_path):
    """A gemma4 checkpoint with vision and audio towers: their tensors are skipped, text logits match HF."""
    cfg = gt.multimodal(gt.E2B_TEXT)
    cfg["vision_config"] = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 64,
    }  # fmt: skip
    cfg["audio_config"] = {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "subsampling_conv_channels": [8, 4], "output_proj_dims": 32,
    }  # fmt: skip
    hf = gt.make_checkpoint(cfg, tmp_path, seed=3)
    rt = Gemma4Runtime.from_pretrained(tmp_path, max_batch_size=1, max_seq_len=32)
    ids = [[2, 5, 250, 9, 17, 30]]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits[0]
    assert torch.equal(rt.logits(ids)[0], ref)


def test_cache_layout_follows_the_model(checkpoints):
    """E2B-like: sliding layers keep a ring of W entries, KV-shared layers keep nothing."""
    rt = Gemma4Runtime.from_pretrained(checkpoints["e2b_like"][0], max_batch_size=2, max_seq_len=40)
    assert [k is None for k in rt.cache.k] == [False, False, False, True, True, True]
    assert [tuple(k.shape) for k in rt.cache.k[:3]] == [(2, 8, 1, 16), (2, 8, 1, 16), (2, 40, 1, 32)]


def test_batch_does_not_change_results(dense_rt):
    prompts = _prompts(seed=3)
    batched = dense_rt.generate(prompts, max_new_tokens=12)
    for p, r in zip(prompts, batched):
        assert dense_rt.generate([p], max_new_tokens=12)[0].token_ids == r.token_ids


def test_logits_match_hf_forward(checkpoints):
    path, hf = checkpoints["e2b_like"]
    rt = Gemma4Runtime.from_pretrained(path, max_batch_size=2, max_seq_len=64)
    prompts = _prompts(lengths=(1, 13, 20))
    out = rt.logits(prompts)
    for p, lg in zip(prompts, out):
        assert lg.shape == (len(p), 256) and lg.dtype == torch.float32
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([p])).logits[0]
        assert ((lg - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_sampling_reproducible_with_seed(dense_rt):
    prompts = _prompts(seed=4)
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95)
    a = dense_rt.generate(prompts, seed=123, **kw)
    b = dense_rt.generate(prompts, seed=123, **kw)
    c = dense_rt.generate(prompts, seed=321, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = [r.token_ids for r in dense_rt.generate(prompts, max_new_tokens=16)]
    assert [r.token_ids for r in a] != greedy
    # top_k=1 and a tiny top_p leave only the argmax: sampling collapses to greedy.
    assert [r.token_ids for r in dense_rt.generate(prompts, max_new_tokens=16, temperature=1.0, top_k=1)] == greedy
    assert [r.token_ids for r in dense_rt.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=1e-6)] == greedy


def test_sampler_distribution():
    """The exponential race samples from softmax(logits / T) restricted by top-k / top-p."""
    from gemma4x.runtime.sampler import Sampler, SamplingParams

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1).contiguous()
    draws = Sampler(SamplingParams(temperature=1.0), seed=0, device=torch.device("cpu"))(logits)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    draws = Sampler(SamplingParams(temperature=1.0, top_p=0.7), seed=0, device=torch.device("cpu"))(logits)
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: the two most likely survive
    draws = Sampler(SamplingParams(temperature=1.0, top_k=3), seed=0, device=torch.device("cpu"))(logits)
    assert set(draws.tolist()) == {0, 1, 2}


def test_stop_token_ids_stop_each_sequence_on_its_own(dense_rt):
    prompts = _prompts(seed=5)
    free = dense_rt.generate(prompts, max_new_tokens=20)
    stop = free[0].token_ids[4]
    stopped = dense_rt.generate(prompts, max_new_tokens=20, stop_token_ids=[stop])
    for f, s in zip(free, stopped):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop) + 1
            assert s.token_ids == f.token_ids[:cut] and s.finish_reason == "stop"  # stop id included
        else:
            assert s.token_ids == f.token_ids and s.finish_reason == "length"
    assert len(stopped[0].token_ids) <= 5


def test_generation_config_eos_and_suppress_tokens(tmp_path, checkpoints):
    path, _ = checkpoints["dense"]
    base = Gemma4Runtime.from_pretrained(path, max_batch_size=4, max_seq_len=64)
    prompts = _prompts(seed=6)
    free = base.generate(prompts, max_new_tokens=10)
    eos, banned = free[1].token_ids[2], free[0].token_ids[0]

    gt.make_checkpoint(gt.DENSE, tmp_path, seed=2, generation={"eos_token_id": [eos], "suppress_tokens": [banned]})
    rt = Gemma4Runtime.from_pretrained(tmp_path, max_batch_size=4, max_seq_len=64)
    assert rt.eos_token_ids == (eos,) and rt.suppress_tokens == (banned,)
    out = rt.generate(prompts, max_new_tokens=10)
    assert all(banned not in r.token_ids for r in out)
    assert out[0].token_ids[0] != free[0].token_ids[0]
    r = rt.generate([prompts[1]], max_new_tokens=10)[0]
    cut = free[1].token_ids.index(eos) + 1
    if banned not in free[1].token_ids[:cut]:  # suppression did not change this prefix
        assert r.token_ids == free[1].token_ids[:cut] and r.finish_reason == "stop"


def test_default_eos_from_generation_config(checkpoints):
    path, _ = checkpoints["dense"]
    gen = json.loads((path / "generation_config.json").read_text())
    rt = Gemma4Runtime.from_pretrained(path, max_batch_size=1, max_seq_len=16)
    eos = gen["eos_token_id"]
    assert rt.eos_token_ids == tuple(eos if isinstance(eos, list) else [eos])


def test_text_prompts_with_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from gemma4x.checkpoint import write_tiny_tokenizer

    cfg = {**gt.DENSE, "vocab_size": 320}
    gt.make_checkpoint(cfg, tmp_path, seed=3)
    write_tiny_tokenizer(tmp_path, 300)
    rt = Gemma4Runtime.from_pretrained(tmp_path, max_batch_size=2, max_seq_len=64)
    texts = ["hello world", "the quick brown fox"]
    out = rt.generate(texts, max_new_tokens=8)
    ids = [rt.tokenizer.encode(t) for t in texts]
    assert all(i[0] == 2 for i in ids)  # one BOS
    by_ids = rt.generate(ids, max_new_tokens=8)
    for a, b in zip(out, by_ids):
        assert a.token_ids == b.token_ids
        assert isinstance(a.text, str) and a.text == rt.tokenizer.decode(a.token_ids)


def test_text_prompt_without_tokenizer_is_an_error(dense_rt):
    with pytest.raises(ValueError, match="prompt 0 is text but no tokenizer is loaded"):
        dense_rt.generate(["hello"], max_new_tokens=2)


def test_token_ids_work_when_tokenizers_package_is_missing(tmp_path, monkeypatch):
    """A checkpoint with tokenizer.json must still load and take token ids without `tokenizers`."""
    pytest.importorskip("tokenizers")
    from gemma4x import tokenizer as tok
    from gemma4x.checkpoint import write_tiny_tokenizer

    cfg = {**gt.DENSE, "vocab_size": 320}
    gt.make_checkpoint(cfg, tmp_path, seed=3)
    write_tiny_tokenizer(tmp_path, 300)

    def missing():
        raise tok.TokenizerUnavailableError("no tokenizers package")

    monkeypatch.setattr(tok, "require_tokenizers", missing)
    rt = Gemma4Runtime.from_pretrained(tmp_path, max_batch_size=1, max_seq_len=64)
    assert rt.tokenizer is None
    assert len(rt.generate([[2, 5, 6]], max_new_tokens=3)[0].token_ids) == 3
    with pytest.raises(ValueError, match="`tokenizers`"):
        rt.generate(["hello"], max_new_tokens=2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda rt: rt.generate([[5, 6], [7, 256]], max_new_tokens=4), r"prompt 1 token 1 has id 256, outside the vocabulary \[0, 256\)"),
        (lambda rt: rt.generate([[5, -1]], max_new_tokens=4), r"prompt 0 token 1 has id -1"),
        (lambda rt: rt.generate([[5], []], max_new_tokens=4), r"prompt 1 is empty"),
        (lambda rt: rt.generate([[5] * 60], max_new_tokens=5), r"prompt 0 has 60 tokens; with max_new_tokens=5 that is 65 > max_seq_len=64"),
        (lambda rt: rt.generate([[5]] * 5, max_new_tokens=4), r"batch of 5 prompts exceeds max_batch_size=4"),
        (lambda rt: rt.generate([[5, 6.0]], max_new_tokens=4), r"prompt 0 token 1 is 6.0, not an integer"),
        (lambda rt: rt.generate([[5]], max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
        (lambda rt: rt.generate([[5]], temperature=-1.0), r"temperature must be a finite number >= 0, got -1.0"),
        (lambda rt: rt.generate([[5]], temperature=1.0, top_k=0), r"top_k must be None or an integer >= 1, got 0"),
        (lambda rt: rt.generate([[5]], temperature=1.0, top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
        (lambda rt: rt.generate("hello"), r"prompts must be a list of prompts"),
        (lambda rt: rt.generate([[5], 7]), r"prompt 1 must be a list of token ids or a string, got int"),
        (lambda rt: rt.logits([[1, 2, 999]]), r"prompt 0 token 2 has id 999"),
        (lambda rt: rt.logits([[3] * 65]), r"prompt 0 has 65 tokens > max_seq_len=64"),
    ],
)  # fmt: skip
def test_bad_input_raises_and_runtime_keeps_working(dense_rt, call, match):
    prompts = _prompts(seed=7)
    before = [r.token_ids for r in dense_rt.generate(prompts, max_new_tokens=6)]
    with pytest.raises(ValueError, match=match):
        call(dense_rt)
    assert [r.token_ids for r in dense_rt.generate(prompts, max_new_tokens=6)] == before


def test_full_batch_and_full_length(dense_rt):
    """max_batch_size prompts, one of them filling max_seq_len exactly."""
    prompts = _prompts(seed=8, lengths=(3, 5, 44, 9))
    out = dense_rt.generate(prompts, max_new_tokens=20)
    assert [len(r.token_ids) for r in out if r.finish_reason == "length"] == [20] * sum(
        r.finish_reason == "length" for r in out
    )
    for p, r in zip(prompts, out):
        assert r.token_ids == dense_rt.generate([p], max_new_tokens=20)[0].token_ids


def test_empty_batch(dense_rt):
    assert dense_rt.generate([], max_new_tokens=3) == []


# ---- GPU (run on the device machine: pytest -m cuda) ----------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(gt.CONFIGS))
def test_cuda_bf16_greedy_agrees_with_hf(checkpoints, name):
    """bf16 on CUDA: greedy tokens agree with HF bf16 generate on >= 95% of steps."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    path, _ = checkpoints[name]
    cls = Gemma4ForCausalLM if gt.CONFIGS[name]["model_type"] == "gemma4_text" else Gemma4ForConditionalGeneration
    hf16 = cls.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    rt = Gemma4Runtime.from_pretrained(path, device="cuda", dtype=torch.bfloat16, max_batch_size=4, max_seq_len=64)
    assert _agreement(hf16, rt, _prompts(), device="cuda") >= 0.95


@pytest.mark.cuda
def test_cuda_logits_and_sampling(checkpoints):
    """logits() on CUDA (default dtype bf16) within 2x HF CUDA bf16's error; seeded sampling repeats."""
    from transformers import Gemma4ForCausalLM

    path, hf32 = checkpoints["dense"]
    hf16 = Gemma4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    rt = Gemma4Runtime.from_pretrained(path, device="cuda", max_batch_size=4, max_seq_len=64)
    assert rt.dtype == torch.bfloat16
    prompts = _prompts()
    for p, lg in zip(prompts, rt.logits(prompts)):
        assert lg.dtype == torch.float32 and lg.device.type == "cpu"
        with torch.no_grad():
            ref = hf32(input_ids=torch.tensor([p])).logits[0]
            hf_err = (hf16(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu() - ref).abs().max()
        assert (lg - ref).abs().max() <= 2 * hf_err + 1e-3 * ref.abs().max()
    kw = dict(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5)
    assert [r.token_ids for r in rt.generate(prompts, **kw)] == [r.token_ids for r in rt.generate(prompts, **kw)]


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(gt.CONFIGS))
def test_cuda_graph_decode_matches_eager(checkpoints, name):
    """Graph replay (padded bucket, whole-slab full attention) decodes like the eager path."""
    path, _ = checkpoints[name]
    kw = dict(device="cuda", dtype=torch.bfloat16, max_batch_size=4, max_seq_len=64)
    graphs = Gemma4Runtime.from_pretrained(path, use_cuda_graphs=True, **kw)
    eager = Gemma4Runtime.from_pretrained(path, use_cuda_graphs=False, **kw)
    assert graphs.graphs is not None and eager.graphs is None
    prompts = _prompts(lengths=(3, 20, 7))  # 3 rows in a bucket of 4: one padding row
    stop = eager.generate(prompts, max_new_tokens=STEPS)[0].token_ids[5]  # one row finishes early
    a = graphs.generate(prompts, max_new_tokens=STEPS, stop_token_ids=[stop])
    b = eager.generate(prompts, max_new_tokens=STEPS, stop_token_ids=[stop])
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra.token_ids, rb.token_ids))
    total = sum(max(len(ra.token_ids), len(rb.token_ids)) for ra, rb in zip(a, b))
    assert same / total >= 0.95, (same, total)
    # Greedy through graphs twice in a row gives the same tokens (no state leaks between calls).
    assert [r.token_ids for r in graphs.generate(prompts, max_new_tokens=8)] == [
        r.token_ids for r in graphs.generate(prompts, max_new_tokens=8)
    ]


def test_cuda_graphs_need_cuda(checkpoints):
    with pytest.raises(ValueError, match="use_cuda_graphs needs a CUDA device, got cpu"):
        Gemma4Runtime.from_pretrained(checkpoints["dense"][0], max_batch_size=1, max_seq_len=8, use_cuda_graphs=True)
