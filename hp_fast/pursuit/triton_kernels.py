"""The ``@triton.jit`` kernels of the ``"triton"`` backend, and every block configuration the
launcher (``triton_backend``) can pick (docs/fast-pursuit.md sections 1, 3-5).

State per head, fp32: ``X (v, r)`` (``F = D P M.T`` for the L1 rule, ``K = F L`` with
``L L.T = Z.T Z`` for ``l2``/``ormp``) and ``o (v,)`` = ``||P d_j||^2``, NaN for atoms never to
choose (chosen, zero, inside the span).

* ``score_kernel``   grid (heads, vocab tiles): a tile of ``F @ Z.T`` is formed on chip and
  reduced over samples (``|.|``), or the squared row norms of ``K`` are taken; scaled
  (``1/||d_j||``, ``1/||d_j||^2`` or ``1/o_j``), invalid atoms masked, and each tile writes its
  best (score, atom). No ``(v, n)`` buffer exists (section 1).
* ``update_kernel``  grid (head blocks, vocab tiles): the new column ``a = D q`` for a block of
  heads is one on-chip product of a dictionary tile with the block's ``q`` rows (the dictionary
  tile is read once per head block, in its own dtype: bf16/fp16/fp32), fused with the rank-one
  update ``X -= a outer c`` (``c = M q`` or ``L.T M q``) and ``o -= a^2``.

``score_config`` / ``update_config`` are the only places block sizes are chosen;
``launch_configs`` lists them all (ahead-of-time compilation: ``triton_aot``). Register budget
(``triton_aot.BUDGET``, measured for sm_80 and sm_90 in benchmarks/RESULTS.md, "Kernel
resources"): the score kernel walks the width of X in ``BK`` columns (``chunk_cols``: 32, and
16 for the tensor-core splits below width 256). It used to hold a whole ``(BV, BR)`` tile of
X, which cost 255 registers and 124 bytes of spills per thread on sm_90 at ``BR`` = 128 (272
bytes of stack with 64 rows). Tiles are ``ROWS_WIDE`` = 16 vocabulary rows for rows of width
``BR >= 128`` (32 below), which takes the update kernel from 178-247 registers to 102-136 at
widths 128-256. The tiling only regroups the same per-atom scores (each tile keeps its lowest
near-best index), so selections stay the reference's (tests/unit/test_triton_somp.py).

``tl.dot`` runs in ``PRECISION`` (``DOT_PRECISIONS``): ``"ieee"`` (default, fp32 FMA, no tensor
cores) or a split precision that runs on tensor cores (``"tf32x3"``, ``"bf16x3"``,
``"bf16x6"``); whether those keep the selections exact is decided on a GPU
(benchmarks/bench_precision.py, tests/gpu). The interpreter ignores the argument (it multiplies
in fp32 with numpy) and knows only tf32/tf32x3/ieee, so under ``TRITON_INTERPRET=1`` the
launcher passes ``"ieee"`` whatever was asked (``kernel_precision``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE = {"l1": 0, "l2": 1, "ormp": 2}
DICTIONARY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what update_kernel reads
MIN_BR = 16  # smallest padded width of X rows (tl.dot needs 16)
DOT_PRECISIONS = ("ieee", "tf32x3", "bf16x3", "bf16x6")  # fp32 products: exact FMA, or split
ROWS_WIDE = 16  # vocabulary rows per tile when X rows are BR >= WIDE_BR wide (else 32)
WIDE_BR = 128


@triton.jit
def score_kernel(X_ptr, Z_ptr, orth_ptr, tol_ptr, scale_ptr, best_ptr, arg_ptr,
                 v, n, r, n_tiles, rtol,
                 MODE: tl.constexpr, NORMALIZE: tl.constexpr,
                 BV: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: heads * v * r passes 2**31 on big models
    tile = tl.program_id(1)
    rows = tile * BV + tl.arange(0, BV)
    rmask = rows < v
    x_rows = X_ptr + b * v * r + rows[:, None].to(tl.int64) * r  # (BV, 1) row starts of X
    score = tl.zeros([BV], dtype=tl.float32)
    if MODE == 0:
        for n0 in range(0, n, BN):  # a (BV, BN) tile of F @ Z.T, reduced over samples on chip
            ns = n0 + tl.arange(0, BN)
            corr = tl.zeros([BV, BN], dtype=tl.float32)
            for k0 in tl.static_range(0, BR, BK):  # BK columns at a time: registers stay flat
                ks = k0 + tl.arange(0, BK)
                x = tl.load(x_rows + ks[None, :], mask=rmask[:, None] & (ks[None, :] < r),
                            other=0.0)  # (BV, BK)
                zc = tl.load(Z_ptr + b * n * r + ns[:, None] * r + ks[None, :],
                             mask=(ns[:, None] < n) & (ks[None, :] < r), other=0.0)  # (BN, BK)
                corr = tl.dot(x, tl.trans(zc), corr, input_precision=PRECISION)
            score += tl.sum(tl.abs(corr), axis=1)
    else:
        for k0 in tl.static_range(0, BR, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(x_rows + ks[None, :], mask=rmask[:, None] & (ks[None, :] < r), other=0.0)
            score += tl.sum(x * x, axis=1)
    o = tl.load(orth_ptr + b * v + rows, mask=rmask, other=float("nan"))
    tol = tl.load(tol_ptr + rows, mask=rmask, other=0.0)
    if MODE == 2:
        score = score / o
    elif NORMALIZE:
        score = score * tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    valid = rmask & (o > tol)  # NaN compares false: chosen / retired atoms drop out
    score = tl.where(valid, score, float("-inf"))
    best = tl.max(score, axis=0)
    # lowest index among the near-best (within rtol, as the torch path's `pick`): fp32 cannot
    # order exact duplicates or true ties, so both paths resolve them the reference's way
    thr = tl.where(best == float("-inf"), best, best - rtol * tl.abs(best))
    arg = tl.min(tl.where(score >= thr, rows, 2147483647), axis=0)
    tl.store(best_ptr + b * n_tiles + tile, best)
    tl.store(arg_ptr + b * n_tiles + tile, arg)


@triton.jit
def update_kernel(D_ptr, Qn_ptr, C_ptr, X_ptr, orth_ptr, B, v, d, r,
                  BH: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
                  PRECISION: tl.constexpr):
    hb = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BV + tl.arange(0, BV)
    heads = hb * BH + tl.arange(0, BH)
    rmask = rows < v
    hmask = heads < B
    # a = D_tile @ Q_block.T: the new column D q of every head of the block, fp32 accumulation
    acc = tl.zeros([BV, BH], dtype=tl.float32)
    for d0 in range(0, d, BD):
        ds = d0 + tl.arange(0, BD)
        dt = tl.load(D_ptr + rows[:, None].to(tl.int64) * d + ds[None, :],
                     mask=rmask[:, None] & (ds[None, :] < d), other=0.0).to(tl.float32)
        qt = tl.load(Qn_ptr + heads[None, :] * d + ds[:, None],
                     mask=hmask[None, :] & (ds[:, None] < d), other=0.0).to(tl.float32)
        acc += tl.dot(dt, qt, input_precision=PRECISION)
    cols = tl.arange(0, BR)
    hsel = tl.arange(0, BH)
    for h in tl.static_range(BH):
        head = (hb * BH + h).to(tl.int64)
        if head < B:
            a = tl.sum(tl.where(hsel[None, :] == h, acc, 0.0), axis=1)  # (BV,) column h
            c = tl.load(C_ptr + head * r + cols, mask=cols < r, other=0.0)
            xp = X_ptr + head * v * r + rows[:, None] * r + cols[None, :]
            xm = rmask[:, None] & (cols[None, :] < r)
            x = tl.load(xp, mask=xm, other=0.0)
            tl.store(xp, x - a[:, None] * c[None, :], mask=xm)  # rank-one update of F or K
            op = orth_ptr + head * v + rows
            o = tl.load(op, mask=rmask, other=0.0)
            tl.store(op, o - a * a, mask=rmask)


def next_pow2(x: int, lo: int = MIN_BR) -> int:
    """The smallest power of two >= x, and at least lo."""
    return max(lo, 1 << max(0, (int(x) - 1).bit_length()))


def tile_rows(br: int) -> int:
    """Vocabulary rows per tile for X rows padded to ``br``: fewer for wide rows (registers)."""
    return ROWS_WIDE if br >= WIDE_BR else 32


def chunk_cols(br: int, precision: str) -> int:
    """Columns of X per step of the score kernel's walk over a row (``BK``): 32, and 16 for the
    tensor-core splits below width 256 (sm_90: tf32x3 at width 64 spills 8 bytes with 32)."""
    return 32 if precision == "ieee" or br >= 256 else 16


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``DOT_PRECISIONS`` and the installed Triton compiles it."""
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {DOT_PRECISIONS} "
                         "('ieee': exact fp32 products, the default)")
    have = supported_precisions()
    if precision not in have:
        raise ValueError(f"precision={precision!r} is not supported by triton "
                         f"{triton.__version__} (it has {have}); use 'ieee'")
    return precision


def supported_precisions() -> tuple[str, ...]:
    """The ``DOT_PRECISIONS`` the installed Triton's CUDA backend accepts (all when unknown)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        allowed = CUDAOptions.allowed_dot_input_precisions
    except Exception:  # noqa: BLE001 - no CUDA backend to ask: let the compiler decide
        return DOT_PRECISIONS
    return tuple(p for p in DOT_PRECISIONS if p in allowed)


def kernel_precision(precision: str) -> str:
    """What the kernels get: ``precision`` when compiled, ``"ieee"`` under the interpreter
    (which ignores the argument and rejects the bf16 splits)."""
    check_precision(precision)
    try:
        interpreting = bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton: the environment decides
        import os
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "ieee" if interpreting else precision


def score_config(mode: int, normalize: bool, r: int, precision: str = "ieee") -> dict:
    """Constexprs of score_kernel for rule ``mode`` (MODE values) over X rows of width r.

    Only the L1 rule (mode 0) multiplies; the others get ``PRECISION="ieee"`` (unused) so one
    compiled variant serves every precision."""
    br = next_pow2(r)
    precision = precision if mode == MODE["l1"] else "ieee"
    return dict(MODE=mode, NORMALIZE=normalize, BV=tile_rows(br), BN=16, BR=br,
                BK=min(br, chunk_cols(br, precision)), PRECISION=precision)


def update_config(r: int, precision: str = "ieee") -> dict:
    """Constexprs of update_kernel for X rows of width r."""
    br = next_pow2(r)
    return dict(BH=16, BV=tile_rows(br), BD=32, BR=br, PRECISION=precision)


def launch_configs(max_r: int = 256, precisions=("ieee",)) -> list[tuple[str, dict]]:
    """Every (kernel name, constexprs) the launcher can pick for rows of width r <= max_r and
    the given dot precisions (``DOT_PRECISIONS`` for all of them).

    X rows are ``r = dh`` wide for the L1 rule and ``min(n, dh)`` for l2/ormp, padded to a power of
    two (``BR``). The launcher passes ``NORMALIZE=False`` for ormp (scale invariant). update_kernel
    reads the dictionary in each of ``DICTIONARY_DTYPES``; every other pointer is fp32 (Z, X, o,
    scales, best), int32 (arg)."""
    widths = sorted({next_pow2(w) for w in range(1, max_r + 1)})
    rules = [(MODE["l1"], True), (MODE["l1"], False), (MODE["l2"], True), (MODE["l2"], False),
             (MODE["ormp"], False)]
    out = []
    for p in precisions:
        check_precision(p)
        out += [("score_kernel", score_config(m, nz, w, p)) for m, nz in rules for w in widths
                if p == "ieee" or m == MODE["l1"]]
        out += [("update_kernel", update_config(w, p)) for w in widths]
    return out
