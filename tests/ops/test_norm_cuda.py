"""GPU tests of the RMSNorm-family kernels against gemma4x.reference.norm.

The reference runs on the same GPU inputs with the same rounding points, so for 16-bit dtypes
the kernels must agree bit for bit except where the fp32 reduction order flips a rounding
(rare, one ulp). fp32 outputs carry the reduction-order difference (a few fp32 ulps).
"""

import pytest
import torch

from gemma4x import ops
from gemma4x.reference import norm as ref

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 7, 111, 769, 1536, 2560, 2816, 3840, 5376]
ROWS = [0, 1, 7, 4097]


def _poison_allocator(numel: int, dtype) -> None:
    # The caching allocator hands the freed block to the next allocation of similar size, so an
    # output slot the kernel fails to write shows up as NaN instead of stale valid data.
    torch.empty(max(numel, 1), dtype=dtype, device="cuda").fill_(float("nan"))


def assert_matches(
    out: torch.Tensor,
    expected: torch.Tensor,
    max_ulps: int = 1,
    max_mismatch: float = 1e-3,
    magnitude: torch.Tensor | None = None,
):
    """Each element within ``max_ulps`` units in the last place of the output dtype, the unit taken
    at ``magnitude`` (default: the expected value). An output that is a cancellation (n3 + residual
    near 0) inherits the error of its operands, so callers pass the operands' magnitude there."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    o, e = out.double(), expected.double()
    mag = e.abs() if magnitude is None else torch.maximum(e.abs(), magnitude.double().abs())
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[out.dtype]
    # fp32 outputs also carry the fp32 reduction-order difference: a few ulps.
    ulps = max_ulps if out.dtype != torch.float32 else 8 * max_ulps
    # Below the smallest normal the spacing stops shrinking (fp16 subnormals).
    tiny = torch.finfo(out.dtype).smallest_normal
    ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(tiny))) - mant)
    diff = (o - e).abs()
    assert (diff <= ulps * ulp + 1e-30).all(), f"max error {(diff / ulp).max().item():.2f} ulp"
    if out.dtype != torch.float32:
        assert (diff > 0).double().mean().item() <= max_mismatch


def tail_magnitude(x1, x2, residual, w1, w2, w3, scalar, eps=1e-6):
    """Magnitude through which a one-ulp flip at any rounding point of the tail reaches the output.

    n1 + n2 and n3 + residual can cancel, so an output near zero carries the rounding error of its
    much larger operands: |scalar| * (|residual| + |w3| * r3 * (|n1| + |n2|)), computed in fp64.
    """
    d = [t.double() for t in (x1, x2, residual, w1, w2, w3, scalar)]
    x1, x2, residual, w1, w2, w3, scalar = d
    rms = lambda t: (t.pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # noqa: E731
    n1, n2 = x1 * rms(x1) * w1, x2 * rms(x2) * w2
    r3 = rms(n1 + n2)
    return scalar.abs() * (residual.abs() + w3.abs() * r3 * (n1.abs() + n2.abs()))


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(1234)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(dtype, hidden, rows, gen):
    x = _rand((rows, hidden), dtype, gen, 3.0)
    w = _rand((hidden,), dtype, gen) + 1
    for weight in (w, None):
        _poison_allocator(rows * hidden, dtype)
        assert_matches(ops.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm(dtype, hidden, rows, gen):
    x = _rand((rows, hidden), dtype, gen)
    residual = _rand((rows, hidden), dtype, gen, 4.0)
    w = _rand((hidden,), dtype, gen)
    expected_residual = residual.clone()
    expected = ref.fused_add_rms_norm(x, expected_residual, w, 1e-6)
    _poison_allocator(rows * hidden, dtype)
    out = ops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual, expected_residual)  # elementwise add: exact
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_moe_tail_norm(dtype, hidden, rows, gen):
    x1, x2, residual = _rand((rows, hidden), dtype, gen, 2.0), _rand((rows, hidden), dtype, gen, 0.3), _rand(
        (rows, hidden), dtype, gen, 5.0
    )
    w1, w2, w3 = (_rand((hidden,), dtype, gen) for _ in range(3))
    scalar = _rand((1,), dtype, gen)
    expected = ref.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, 1e-6, 1e-5, 1e-4)
    _poison_allocator(rows * hidden, dtype)
    out = ops.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, 1e-6, 1e-5, 1e-4)
    # Four rounding points in a chain (norm, sum, norm, residual add, scalar): a one-ulp flip in an
    # intermediate (fp32 reduction order) can reach the output as up to about 4 ulps.
    assert_matches(out, expected, max_ulps=4, magnitude=tail_magnitude(x1, x2, residual, w1, w2, w3, scalar))
    # Same inputs, same kernel: bit-identical (a race would show up here).
    assert torch.equal(out, ops.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, 1e-6, 1e-5, 1e-4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [769, 1536, 2816, 5376])
@pytest.mark.parametrize("rows", [1, 7, 300, 4097])
def test_moe_tail_norm_without_cancellation(dtype, hidden, rows, gen):
    """Positive inputs and weights: no sum cancels, so every output is within 4 ulps of itself.
    Catches indexing or pipeline errors that the cancellation-aware bound above could hide."""
    x1, x2 = _rand((rows, hidden), dtype, gen).abs() + 0.5, _rand((rows, hidden), dtype, gen).abs() + 0.5
    residual = _rand((rows, hidden), dtype, gen).abs() + 1
    w1, w2, w3 = (_rand((hidden,), dtype, gen).abs() + 0.5 for _ in range(3))
    scalar = torch.tensor([0.8], dtype=dtype, device="cuda")
    expected = ref.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, 1e-6, 1e-6, 1e-6)
    assert_matches(ops.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, 1e-6, 1e-6, 1e-6), expected, max_ulps=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_strided_and_batched_inputs(dtype, gen):
    hidden = 2816
    # Rows taken from a wider buffer: the row stride (3000) is not the hidden size, and for
    # bf16 it is not a multiple of 8 elements, so the scalar path runs.
    big = _rand((5, 4, 3000), dtype, gen)
    x = big[..., 17 : 17 + hidden]
    w = _rand((hidden,), dtype, gen)
    assert_matches(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    # 16-byte aligned stride (3008 = 8 * 376): the vector path with a row stride.
    big2 = _rand((7, 3008), dtype, gen)
    x2 = big2[:, :hidden]
    r2 = _rand((7, 3008), dtype, gen)[:, :hidden]
    expected_r2 = r2.clone()
    expected = ref.fused_add_rms_norm(x2, expected_r2, w, 1e-6)
    assert_matches(ops.fused_add_rms_norm(x2, r2, w, 1e-6), expected)
    assert torch.equal(r2, expected_r2)
    s = _rand((1,), dtype, gen)
    # Enough rows for the streaming (bulk-copy) MoE-tail kernel, reading strided rows.
    many = _rand((3, 300, 3008), dtype, gen)[..., :hidden]
    expected = ref.moe_tail_norm(many[0], many[1], many[2], w, w, w, s, 1e-6, 1e-6, 1e-6)
    assert_matches(
        ops.moe_tail_norm(many[0], many[1], many[2], w, w, w, s, 1e-6, 1e-6, 1e-6),
        expected,
        max_ulps=4,
        magnitude=tail_magnitude(many[0], many[1], many[2], w, w, w, s),
    )
    expected = ref.moe_tail_norm(x, x.flip(0), x.flip(1), w, w, w, s, 1e-6, 1e-6, 1e-6)
    assert_matches(
        ops.moe_tail_norm(x, x.flip(0), x.flip(1), w, w, w, s, 1e-6, 1e-6, 1e-6),
        expected,
        max_ulps=4,
        magnitude=tail_magnitude(x, x.flip(0), x.flip(1), w, w, w, s),
    )


def test_broadcast_input_with_zero_row_stride(gen):
    row = _rand((1, 769), torch.bfloat16, gen)
    x = row.expand(9, 769)
    assert_matches(ops.rms_norm(x, None, 1e-6), ref.rms_norm(x, None, 1e-6))


def test_rejects_residual_that_cannot_be_written_in_place(gen):
    x = _rand((4, 6, 64), torch.bfloat16, gen)
    residual = _rand((6, 4, 64), torch.bfloat16, gen).transpose(0, 1)  # not viewable as rows
    with pytest.raises(ValueError, match="residual .* cannot be viewed as"):
        ops.fused_add_rms_norm(x, residual, None, 1e-6)


def test_rejects_weight_on_another_device(gen):
    x = _rand((2, 64), torch.bfloat16, gen)
    with pytest.raises(ValueError, match="rms_norm: weight is on cpu, expected cuda"):
        ops.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-6)


def test_opcheck(gen):
    x = _rand((7, 769), torch.bfloat16, gen)
    r = _rand((7, 769), torch.bfloat16, gen)
    w = _rand((769,), torch.bfloat16, gen)
    s = _rand((1,), torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.gemma4x.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.gemma4x.rms_norm.default, (x, None, 1e-6))
    torch.library.opcheck(torch.ops.gemma4x.fused_add_rms_norm.default, (x, r.clone(), w, 1e-6))
    torch.library.opcheck(torch.ops.gemma4x.moe_tail_norm.default, (x, r, x, w, w, w, s, 1e-6, 1e-6, 1e-6))


def test_cuda_graph_capture_and_replay(gen):
    x1, x2, res = (_rand((16, 2816), torch.bfloat16, gen) for _ in range(3))
    w = _rand((2816,), torch.bfloat16, gen)
    s = _rand((1,), torch.bfloat16, gen)
    residual = res.clone()
    # Warm up on a side stream, as graph capture requires.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.moe_tail_norm(x1, x2, res, w, w, w, s, 1e-6, 1e-6, 1e-6)
        ops.rms_norm(x1, w, 1e-6)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tail = ops.moe_tail_norm(x1, x2, res, w, w, w, s, 1e-6, 1e-6, 1e-6)
        normed = ops.rms_norm(tail, w, 1e-6)
        added = ops.fused_add_rms_norm(normed, residual, w, 1e-6)
    # New inputs in the captured buffers: replay must recompute from them.
    x1.copy_(_rand((16, 2816), torch.bfloat16, gen))
    residual.copy_(res)
    graph.replay()
    torch.cuda.synchronize()
    # Replay runs the same kernels as eager calls on the same inputs: results are identical.
    exp_tail = ops.moe_tail_norm(x1, x2, res, w, w, w, s, 1e-6, 1e-6, 1e-6)
    assert torch.equal(tail, exp_tail)
    exp_res = res.clone()
    exp_added = ops.fused_add_rms_norm(ops.rms_norm(exp_tail, w, 1e-6), exp_res, w, 1e-6)
    assert torch.equal(added, exp_added) and torch.equal(residual, exp_res)


def test_torch_compile_fullgraph(gen):
    x1, x2, res = (_rand((33, 1536), torch.bfloat16, gen) for _ in range(3))
    w = _rand((1536,), torch.bfloat16, gen)
    s = _rand((1,), torch.bfloat16, gen)

    def block(a, b, r):
        t = ops.moe_tail_norm(a, b, r, w, w, w, s, 1e-6, 1e-6, 1e-6)
        return ops.rms_norm(t * 2, w, 1e-6)

    compiled = torch.compile(block, fullgraph=True)
    # The compiled graph calls the same kernels; the `* 2` between them is exact in bf16.
    assert torch.equal(compiled(x1, x2, res), block(x1, x2, res))
