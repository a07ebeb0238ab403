"""GPU tests of the layer-tail ops against the unfused PyTorch sequences they replace.

``geglu(gate, up)`` must equal ``F.gelu(gate, approximate="tanh") * up`` and
``residual_rms_norm(r, x, w, eps, s)`` must equal ``(r + ops.rms_norm(x, w, eps)) * s`` BIT FOR BIT
on the GPU (the model's decode outputs do not change). Compared as raw bits, so -0.0 vs +0.0
would fail too. Inputs are finite (NaN payloads are not compared).
"""

import pytest
import torch
import torch.nn.functional as F

from gemma4x import ops

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 256: E2B's PLE width; 1536 / 5376: E2B / 31B hidden; 6144 / 12288 / 21504: MLP widths.
COLS = [1, 7, 111, 256, 769, 1536, 5376, 6144, 12288, 21504]
HIDDEN = [1, 7, 111, 256, 769, 1536, 2560, 2816, 5376]
ROWS = [0, 1, 7, 133]
EPS = 1e-6
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    a, b = got.contiguous().view(_INT[got.dtype]), want.contiguous().view(_INT[want.dtype])
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{bad.shape[0]} of {a.numel()} elements differ, first at {i}: {got[i].item()!r} vs {want[i].item()!r}"
        )


def _poison(numel: int, dtype) -> None:
    # The caching allocator hands this freed block to the next allocation of similar size, so a
    # slot the kernel fails to write shows up as NaN (and fails the bit comparison).
    torch.empty(max(numel, 1), dtype=dtype, device="cuda").fill_(float("nan"))


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(1234)


def unfused_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def unfused_tail(residual, x, w, eps, scalar=None):
    out = residual + ops.rms_norm(x, w, eps)
    return out if scalar is None else out * scalar


# ---- geglu ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_geglu_bit_exact(dtype, cols, rows, gen):
    gate, up = _rand((rows, cols), dtype, gen, 3.0), _rand((rows, cols), dtype, gen)
    _poison(rows * cols, dtype)
    assert_bits_equal(ops.geglu(gate, up), unfused_geglu(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_bit_exact_over_the_whole_range(dtype, gen):
    # Every finite bf16/fp16 pattern as the gate (fp32: a log-uniform sweep), both signs, zeros,
    # tiny and huge values: tanh saturates, x^3 overflows to inf, subnormals.
    if dtype == torch.float32:
        mag = torch.logspace(-40, 38, 200_000, device="cuda", dtype=torch.float64).float()
        gate = torch.cat([mag, -mag, torch.zeros(2, device="cuda")])
    else:
        bits = torch.arange(-(2**15), 2**15, device="cuda", dtype=torch.int32).to(torch.int16)
        gate = bits.view(dtype)
        gate = gate[torch.isfinite(gate)]
    up = _rand(gate.shape, dtype, gen)
    assert_bits_equal(ops.geglu(gate, up), unfused_geglu(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_strided_views_of_a_fused_gate_up_buffer(dtype, gen):
    # The fused gate/up GEMM output [B, T, 2I], split as FusedLinear splits it: views, no copy.
    for inter in (6144, 111):
        buf = _rand((2, 5, 2 * inter), dtype, gen, 2.0)
        gate, up = buf.split([inter, inter], dim=-1)
        assert gate.stride() == up.stride() == (10 * inter, 2 * inter, 1)
        assert_bits_equal(ops.geglu(gate, up), unfused_geglu(gate, up))
    # The PLE input of layer l: PLI[:, :, l] of a [B, T, L, P] tensor (rows of stride L * P).
    pli = _rand((2, 3, 35, 256), dtype, gen)
    for layer in (0, 7, 34):
        gate = _rand((2, 3, 256), dtype, gen, 3.0)
        assert_bits_equal(ops.geglu(gate, pli[:, :, layer]), unfused_geglu(gate, pli[:, :, layer]))
    # An odd column offset: not 16-byte aligned, the one-element path.
    buf = _rand((9, 1000), dtype, gen, 2.0)
    gate, up = buf[:, 1:480], buf[:, 481:960]
    assert_bits_equal(ops.geglu(gate, up), unfused_geglu(gate, up))
    # Zero row stride (a broadcast row) is a legal read.
    row = _rand((1, 768), dtype, gen)
    gate = row.expand(4, 768)
    up = _rand((4, 768), dtype, gen)
    assert_bits_equal(ops.geglu(gate, up), unfused_geglu(gate, up))


def test_geglu_more_rows_than_one_grid_dimension(gen):
    gate, up = _rand((70_000, 16), torch.bfloat16, gen, 3.0), _rand((70_000, 16), torch.bfloat16, gen)
    _poison(70_000 * 16, torch.bfloat16)
    assert_bits_equal(ops.geglu(gate, up), unfused_geglu(gate, up))


def test_geglu_empty_and_rejects_other_device(gen):
    e = torch.empty(0, 64, dtype=torch.bfloat16, device="cuda")
    assert ops.geglu(e, e).shape == (0, 64)
    with pytest.raises(ValueError, match="geglu: up is on cpu, expected cuda"):
        ops.geglu(_rand((2, 64), torch.bfloat16, gen), torch.zeros(2, 64, dtype=torch.bfloat16))


# ---- residual_rms_norm -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("variant", ["weight+scalar", "weight", "scalar_only"])
def test_residual_rms_norm_bit_exact(dtype, hidden, rows, variant, gen):
    x, r = _rand((rows, hidden), dtype, gen, 2.0), _rand((rows, hidden), dtype, gen, 4.0)
    w = _rand((hidden,), dtype, gen) if variant != "scalar_only" else None
    s = _rand((1,), dtype, gen) if variant != "weight" else None
    r0 = r.clone()
    _poison(rows * hidden, dtype)
    got = ops.residual_rms_norm(r, x, w, EPS, s)
    assert_bits_equal(got, unfused_tail(r, x, w, EPS, s))
    assert torch.equal(r, r0)  # out of place


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_rms_norm_strided_rows(dtype, gen):
    hidden = 2816
    w, s = _rand((hidden,), dtype, gen), _rand((1,), dtype, gen)
    # 16-byte aligned row stride (3008): the vector path, as rms_norm takes it.
    x = _rand((7, 3008), dtype, gen)[:, :hidden]
    r = _rand((7, 3008), dtype, gen)[:, :hidden]
    assert_bits_equal(ops.residual_rms_norm(r, x, w, EPS, s), unfused_tail(r, x, w, EPS, s))
    # Unaligned (stride 3000, offset 17): both take the one-element path.
    x = _rand((5, 4, 3000), dtype, gen)[..., 17 : 17 + hidden]
    r = _rand((5, 4, 3000), dtype, gen)[..., 17 : 17 + hidden]
    assert_bits_equal(ops.residual_rms_norm(r, x, w, EPS, s), unfused_tail(r, x, w, EPS, s))
    # The model's last_only slice h[:, -1:] of a [B, T, H] residual.
    h = _rand((3, 9, 1536), dtype, gen)[:, -1:]
    m = _rand((3, 1, 1536), dtype, gen)
    w2 = _rand((1536,), dtype, gen)
    assert_bits_equal(ops.residual_rms_norm(h, m, w2, EPS, s), unfused_tail(h, m, w2, EPS, s))


def test_residual_rms_norm_rejects_scalar_on_another_device(gen):
    x = _rand((2, 64), torch.bfloat16, gen)
    with pytest.raises(ValueError, match="residual_rms_norm: scalar is on cpu, expected cuda"):
        ops.residual_rms_norm(x, x, None, EPS, torch.ones(1, dtype=torch.bfloat16))


# ---- custom-op contract, graphs ----------------------------------------------------------------


def test_opcheck(gen):
    buf = _rand((7, 2 * 769), torch.bfloat16, gen)
    x, r = _rand((7, 769), torch.bfloat16, gen), _rand((7, 769), torch.bfloat16, gen)
    w, s = _rand((769,), torch.bfloat16, gen), _rand((1,), torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.gemma4x.geglu.default, (buf[:, :769], buf[:, 769:]))
    torch.library.opcheck(torch.ops.gemma4x.residual_rms_norm.default, (r, x, w, EPS, s))
    torch.library.opcheck(torch.ops.gemma4x.residual_rms_norm.default, (r, x, None, EPS, None))


def test_cuda_graph_capture_and_replay(gen):
    # The PLE layer tail at E2B decode sizes: h2 = h1 + norm(m); g = geglu(gate, pli);
    # out = (h2 + norm(g_proj)) * scalar, captured once and replayed on new inputs.
    H, P = 1536, 256
    h, m, proj = (_rand((1, 1, H), torch.bfloat16, gen) for _ in range(3))
    gate, pli = _rand((1, 1, P), torch.bfloat16, gen, 3.0), _rand((1, 1, 35, P), torch.bfloat16, gen)
    w1, w2, s = _rand((H,), torch.bfloat16, gen), _rand((H,), torch.bfloat16, gen), _rand((1,), torch.bfloat16, gen)

    def step():
        h2 = ops.residual_rms_norm(h, m, w1, EPS)
        g = ops.geglu(gate, pli[:, :, 3])
        return ops.residual_rms_norm(h2, proj, w2, EPS, s), g

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, g = step()
    for t in (h, m, proj, gate):
        t.copy_(_rand(t.shape, torch.bfloat16, gen, 2.0))
    pli.copy_(_rand(pli.shape, torch.bfloat16, gen))
    graph.replay()
    torch.cuda.synchronize()
    assert_bits_equal(out, unfused_tail(unfused_tail(h, m, w1, EPS), proj, w2, EPS, s))
    assert_bits_equal(g, unfused_geglu(gate, pli[:, :, 3]))
