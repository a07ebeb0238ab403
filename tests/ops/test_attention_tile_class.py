"""The prefill kernels' tile classification (csrc/include/gemma4x/attention/tile_class.h), compiled
on the host and checked against the reference mask on random tiles.

A skipped tile must hold no visible pair and a full tile only visible pairs (soundness, always);
without image blocks the classification must also be exact (a tile is partial only when it mixes).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
import torch
from gemma4x.reference.attention import attention_mask

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BIG = 1 << 40
SKIP, PARTIAL, FULL = 0, 1, 2

_PROBE = r"""
#include <cstdio>
#include "gemma4x/attention/tile_class.h"
int main() {
  long long plo, phi, wl, wr, s0, s1; int qbmin, qbmax, unified, full, overlap;
  while (scanf("%lld %lld %lld %lld %d %d %d %lld %lld %d %d", &plo, &phi, &wl, &wr, &qbmin, &qbmax, &unified,
               &s0, &s1, &full, &overlap) == 11) {
    gemma4x::attention::QueryTileSummary q{plo, phi, wl, wr, qbmin, qbmax, unified != 0};
    printf("%d\n", gemma4x::attention::classify_key_tile(q, s0, s1, full != 0, overlap != 0));
  }
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the host probe cannot be compiled")
    d = tmp_path_factory.mktemp("tile_class")
    (d / "probe.cpp").write_text(_PROBE)
    exe = d / "probe"
    subprocess.run(
        ["nvcc", "-std=c++17", f"-I{os.path.join(_REPO, 'csrc', 'include')}", str(d / "probe.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip

    def run(lines: list[str]) -> list[int]:
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)
        return [int(v) for v in out.stdout.split()]

    return run


def _cases(seed: int, with_blocks: bool, unified: bool, n: int = 400):
    rng = random.Random(seed)
    for _ in range(n):
        Lk = rng.randint(1, 96)
        Lq = rng.randint(1, Lk)
        off = Lk - Lq  # queries are the last Lq keys
        bm, bn = rng.choice([(4, 4), (8, 16), (16, 8)])
        m0 = rng.randrange(0, Lq, bm)
        rows = min(bm, Lq - m0)
        n0 = rng.randrange(0, Lk, bn)
        s0, s1 = n0, min(n0 + bn, Lk) - 1
        wl = rng.choice([None, 0, 1, 3, 7, 15, 40])
        wr = rng.choice([0, 0, 0, 2, None]) if not unified else rng.choice([0, 2, None])
        blocks = [-1] * Lk
        if with_blocks:
            for b in range(rng.randint(1, 3)):
                lo = rng.randrange(Lk)
                for t in range(lo, min(Lk, lo + rng.randint(1, 20))):
                    blocks[t] = b
        q_pos = torch.arange(m0, m0 + rows) + off
        k_pos = torch.arange(s0, s1 + 1)
        qb = torch.tensor(blocks)[q_pos]
        kb = torch.tensor(blocks)[k_pos]
        mask = attention_mask(
            q_pos, k_pos, wl, wr, qb if with_blocks else None, kb if with_blocks else None, unified=unified
        )
        qids = [b for b in qb.tolist() if b >= 0]
        kids = [b for b in kb.tolist() if b >= 0]
        qbmin, qbmax = (min(qids), max(qids)) if qids else (2**31 - 1, -1)
        overlap = bool(qids and kids and min(kids) <= qbmax and qbmin <= max(kids))
        line = (
            f"{m0 + off} {m0 + rows - 1 + off} {_BIG if wl is None else wl} {_BIG if wr is None else wr} "
            f"{qbmin} {qbmax} {int(unified)} {s0} {s1} {int(s0 + bn <= Lk)} {int(overlap)}"
        )
        yield line, mask, s0 + bn <= Lk


@pytest.mark.parametrize("with_blocks,unified", [(False, False), (True, False), (True, True)])
def test_classification_is_sound_and_exact_without_blocks(probe, with_blocks, unified):
    cases = list(_cases(hash((with_blocks, unified)) & 0xFFFF, with_blocks, unified))
    got = probe([line for line, _, _ in cases])
    assert len(got) == len(cases)
    seen = set()
    for cls, (line, mask, full_width) in zip(got, cases):
        seen.add(cls)
        if cls == SKIP:
            assert not mask.any(), line
        elif cls == FULL:
            assert mask.all() and full_width, line
        elif not with_blocks:  # partial only when the tile mixes, or is short and all visible
            assert mask.any() and (not mask.all() or not full_width), line
    assert seen == {SKIP, PARTIAL, FULL}  # the random tiles reach every class
