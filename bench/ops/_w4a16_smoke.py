import torch, time
from gemma4x.ops import nvfp4_prefill as P
from gemma4x.reference.nvfp4_w4a16 import w4a16_pack
from gemma4x.reference.quant import nvfp4_quantize, nvfp4_dequantize
N, K, M = 256, 512, 300
q, s, gs = nvfp4_quantize(torch.randn(N, K, device="cuda"))
p = w4a16_pack(q, s)
x = torch.randn(M, K, device="cuda").bfloat16()
for tile in (1, 2):
    out = P.w4a16_gemm_sm90(x, p, gs, tile); torch.cuda.synchronize()
    ref = x.double() @ nvfp4_dequantize(q, s, gs, torch.float64).T
    print("tile", tile, "rel err", ((out.double() - ref).norm() / ref.norm()).item(), flush=True)
