"""The GEMM engine of :mod:`models.genome.api`: every metric as integer and float64 matrix products in
torch, on CUDA (tensor cores) or the CPU. Imported only when it runs, so that the CPU engine
(:mod:`models.genome._cpu`) does not load torch."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from models.cpu_features import fast_int8_gemm
from models.genome._cpu import _MONOMORPHIC_VARIANCE
from models.genome.metrics import Metric

#: Chunks are cut to at most this many variants, so that int8 products of up to ±127 per variant
#: sum exactly in int32 (and indicator products in float32 where there is no int8 GEMM).
_EXACT_CHUNK = 2**20
#: Rows per block of a symmetric float64 product: only blocks on and above the diagonal are
#: multiplied, about half the work of the full product.
_TRIANGLE_BLOCK = 512
#: Variants per standardized float64 block of the GRM within a chunk (N·8 bytes each).
_FLOAT64_BLOCK = 2048
#: torch._int_mm on the CPU (torch 2.13) returns garbage for k = 1 (and an uninitialized matrix
#: for k = 0); narrower products go through float32, exact at that size.
_INT_MM_MIN_K = 8
#: A chunk's weighted joint-missing sums go through sparse products when its pairs of missing
#: calls in one variant number at most 1/this of the dense product's size (1% missing: 1/10,000).
_SPARSE_JOINT_RATIO = 1024
#: Query rows per sparse product (its output is dense).
_SPARSE_ROW_BLOCK = 512

# --- kernels ----------------------------------------------------------------------------------
# Each kernel takes one variant chunk of query and cohort codes (int8 tensors, -1 = missing) and
# adds its sums to the accumulators; the finishers turn the sums into the metric. The counting
# metrics (KING, IBS, the joint-call denominators) are products of small integer matrices, done
# as int8 GEMMs with int32 results (AMX/VNNI on x86), exact; only the GRM's standardized product
# needs float64. Each count "over variants called in both" is written as a sum over all variants
# less a product with the missing-call indicator m, taken over the chunk's columns that hold a
# missing call (all of them in a large cohort, few in a small block). When query and cohort are
# the same array, a product L·Rᵀ whose transpose is also needed is computed once.


def _int_products(left: torch.Tensor, right: torch.Tensor, term_bound: int) -> torch.Tensor:
    """``left @ right.T`` for int8 (n, k) and (m, k), exactly, as int32.

    ``term_bound`` bounds |left·right| per variant; chunks are at most :data:`_EXACT_CHUNK`
    variants, so every sum fits int32, and float32 (the CUDA path: torch's int8 GEMM there wants
    multiples of 8) is exact while k·term_bound ≤ 2²⁴.
    """
    if left.device.type == "cpu" and left.shape[1] >= _INT_MM_MIN_K and fast_int8_gemm():
        return torch._int_mm(left, right.T)
    dtype = torch.float32 if left.shape[1] * term_bound <= 2**24 else torch.float64
    if dtype == torch.float32 and left.device.type == "cuda":
        # Tensor cores in TF32: its 11-bit significand holds every operand here (|value| ≤ 127)
        # exactly and the products sum in float32, so the counts stay exact.
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return (left.to(dtype) @ right.to(dtype).T).round().to(torch.int32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return (left.to(dtype) @ right.to(dtype).T).round().to(torch.int32)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Row sums of an int8 (n, k) chunk as int64; a GEMM with a ones block is the fast way on x86."""
    if x.device.type == "cpu" and x.shape[1] >= _INT_MM_MIN_K and fast_int8_gemm():
        return torch._int_mm(x, x.new_ones(x.shape[1], 8))[:, 0].to(torch.int64)
    return x.sum(1, dtype=torch.int64)


def _column_sums(x: torch.Tensor) -> torch.Tensor:
    """Column sums of an int8 (n, k) chunk as int64, the same way as :func:`_row_sums`."""
    if x.device.type == "cpu" and 8 <= x.shape[0] < 2**24 and fast_int8_gemm():
        return torch._int_mm(x.new_ones(8, x.shape[0]), x)[0].to(torch.int64)
    return x.sum(0, dtype=torch.int64)


class _Sums(dict[str, torch.Tensor]):
    """The accumulators: integer counts in int32 while every total fits (|term| ≤ 16 per variant)."""

    def __init__(self, n_variants: int) -> None:
        super().__init__()
        self.int_dtype = torch.int32 if 16 * n_variants < 2**31 else torch.int64
        #: Coordinates of missing calls whose weighted joint sums are left to one sparse product.
        self.sparse_q: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sparse_a: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        if name in self:
            self[name] += value
        elif value.dtype == torch.int32:
            self[name] = value.to(self.int_dtype)
        else:
            self[name] = value


def _int8(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.int8)  # bool is one byte holding 0/1: no copy


def _add_gram(out: torch.Tensor, z: torch.Tensor) -> None:
    """``out += z zᵀ`` on the row blocks on and above the diagonal; :func:`_mirror` fills the rest."""
    n = z.shape[0]
    for start in range(0, n, _TRIANGLE_BLOCK):
        stop = min(start + _TRIANGLE_BLOCK, n)
        out[start:stop, start:].addmm_(z[start:stop], z[start:].T)


def _mirror(out: torch.Tensor) -> torch.Tensor:
    n = out.shape[0]
    for start in range(_TRIANGLE_BLOCK, n, _TRIANGLE_BLOCK):
        stop = min(start + _TRIANGLE_BLOCK, n)
        out[start:stop, :start] = out[:start, start:stop].T
    return out


def _standardized(codes: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(x - 2p) / sqrt(2p(1-p)) for observed calls, 0 for missing calls and monomorphic variants."""
    variance = 2.0 * p * (1.0 - p)
    usable = variance >= _MONOMORPHIC_VARIANCE
    scale = torch.where(usable, 1.0 / torch.sqrt(torch.where(usable, variance, 1.0)), 0.0)
    z = codes.to(torch.float64).sub_(2.0 * p).mul_(scale)
    return z.masked_fill_(codes < 0, 0.0)


def _check_monomorphic(codes: torch.Tensor, p: torch.Tensor, offset: int) -> None:
    # PLINK 2 stops here too ("Zero-MAF variant is not actually monomorphic"): frequencies that
    # call a variant monomorphic while the genotypes disagree come from some other cohort.
    flat = torch.nonzero(2.0 * p * (1.0 - p) < _MONOMORPHIC_VARIANCE).flatten()
    if flat.numel() == 0:
        return
    calls = codes[:, flat]
    expected = torch.round(2.0 * p[flat]).to(torch.int8)
    wrong = ((calls >= 0) & (calls != expected)).any(dim=0)
    if bool(wrong.any()):
        j = offset + int(flat[torch.nonzero(wrong)[0]])
        raise ValueError(f"variant {j}: the frequencies call it monomorphic but its calls vary")


def _weighted_rows(mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.zeros(mask.shape[0], dtype=w.dtype, device=w.device).index_add_(0, rows, w[cols])


def _add_missing(
    acc: _Sums,
    mq: torch.Tensor,
    ma: torch.Tensor,
    both: torch.Tensor,
    w: torch.Tensor | None,
    symmetric: bool,
    offset: int,
) -> None:
    """Sums for ``Σ w·[called in both] = Σ w - Σ w·m_q - Σ w·m_a + Σ w·m_q·m_a`` (w = 1 if None)."""
    if w is None:
        acc.add("miss_q", _row_sums(_int8(mq)))
        if not symmetric:
            acc.add("miss_a", _row_sums(_int8(ma)))
    else:  # integer weights below 2³²: float64 sums of them are exact
        acc.add("miss_q", _weighted_rows(mq, w))
        if not symmetric:
            acc.add("miss_a", _weighted_rows(ma, w))
    every = both.numel() == mq.shape[1]  # then no copies
    mq_b = _int8(mq if every else mq[:, both])
    ma_b = mq_b if symmetric else _int8(ma if every else ma[:, both])
    if w is None:
        acc.add("joint", _int_products(mq_b, ma_b, 1))
        return
    # Σ w·m_q·m_a: a weighted product of the missing-call indicators, as sparse matrices when
    # missing calls are rare (left for _finish, in one product over all chunks), else with w
    # split into 7-bit digits, one exact int8 GEMM per digit.
    pairs = int((_column_sums(mq_b) * _column_sums(ma_b)).sum())
    if pairs * _SPARSE_JOINT_RATIO <= mq.shape[0] * ma.shape[0] * max(both.numel(), 1):
        acc.sparse_q.append(_coordinates(mq_b, both + offset, w[both]))
        if not symmetric:
            acc.sparse_a.append(_coordinates(ma_b, both + offset, None))
        return
    digits = w[both].to(torch.int64)
    joint = torch.zeros(mq.shape[0], ma.shape[0], dtype=torch.float64, device=w.device)
    shift = 0
    while bool((digits >> shift).any()):
        digit = ((digits >> shift) & 127).to(torch.int8)
        joint.add_(_int_products(mq_b * digit, ma_b, 127), alpha=float(2**shift))
        shift += 7
    acc.add("joint", joint)


def _coordinates(
    mask: torch.Tensor, variant: torch.Tensor, w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, variant, weight) of each missing call in ``mask`` (samples by chosen columns)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    weight = torch.ones_like(rows, dtype=torch.float64) if w is None else w[cols]
    return rows, variant[cols], weight


def _sparse_joint(
    q: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    a: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shape: tuple[int, int],
    n_variants: int,
) -> torch.Tensor:
    """``Σ_v w_v·m_qv·m_av`` from the missing calls' coordinates: sparse products, by row blocks.

    The products hold integers below 2⁵³, so float64 keeps them exact.
    """
    rq, vq, wq = (torch.cat(parts) for parts in zip(*q, strict=True))
    ra, va, _ = (torch.cat(parts) for parts in zip(*a, strict=True))
    out = torch.zeros(shape, dtype=torch.float64, device=rq.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
        warnings.filterwarnings("ignore", "Sparse invariant checks", UserWarning)  # torch ≥ 2.11
        ones = torch.ones_like(va, dtype=torch.float64)
        right = torch.sparse_coo_tensor(
            torch.stack([va, ra]), ones, (n_variants, shape[1]), check_invariants=False
        )
        right = right.to_sparse_csr()
        order = torch.argsort(rq, stable=True)
        rq, vq, wq = rq[order], vq[order], wq[order]
        starts = range(0, shape[0], _SPARSE_ROW_BLOCK)
        edges = torch.searchsorted(rq, torch.tensor([*starts, shape[0]], device=rq.device)).tolist()
        for k, start in enumerate(starts):
            lo, hi = edges[k], edges[k + 1]
            if lo == hi:
                continue
            stop = min(start + _SPARSE_ROW_BLOCK, shape[0])
            left = torch.sparse_coo_tensor(
                torch.stack([rq[lo:hi] - start, vq[lo:hi]]),
                wq[lo:hi],
                (stop - start, n_variants),
                check_invariants=False,
            )
            out[start:stop] = torch.sparse.mm(left.to_sparse_csr(), right).to_dense()
    return out


def _add_standardized_products(
    num: torch.Tensor, q: torch.Tensor, a: torch.Tensor, p: torch.Tensor, offset: int
) -> None:
    """``num += Z_q Z_aᵀ`` for one chunk (on and above the diagonal when ``a is q``)."""
    _check_monomorphic(q, p, offset)
    if a is not q:
        _check_monomorphic(a, p, offset)
    for start in range(0, q.shape[1], _FLOAT64_BLOCK):  # float64 operands stay small
        part = slice(start, start + _FLOAT64_BLOCK)
        zq = _standardized(q[:, part], p[part])
        if a is q:
            _add_gram(num, zq)
        else:
            num.addmm_(zq, _standardized(a[:, part], p[part]).T)


def _accumulate(
    metric: Metric,
    q: torch.Tensor,
    a: torch.Tensor,
    acc: _Sums,
    p: torch.Tensor | None,
    w: torch.Tensor | None,
    offset: int,
) -> None:
    symmetric = a is q
    mq = q < 0
    ma = mq if symmetric else a < 0
    missing_q = mq.any(0)
    missing_a = missing_q if symmetric else ma.any(0)
    # Columns where either side has a missing call; the rest need no correction.
    either = torch.nonzero(missing_q | missing_a).flatten()

    def cols(t: torch.Tensor) -> torch.Tensor:  # no copy when every column holds a missing call
        return t if either.numel() == t.shape[1] else t[:, either]

    if metric == "grm":
        assert p is not None
        if "num" not in acc:
            acc["num"] = q.new_zeros(q.shape[0], a.shape[0], dtype=torch.float64)
        _add_standardized_products(acc["num"], q, a, p, offset)
        both = torch.nonzero(missing_q & missing_a).flatten()
        _add_missing(acc, mq, ma, both, None, symmetric, offset)
    elif metric == "dot":
        xq = q.clamp(min=0)
        acc.add("num", _int_products(xq, xq if symmetric else a.clamp(min=0), 4))
    elif metric == "king":
        # Σ (x_i - x_j)² over variants called in both = 4·IBS0 + HET1_HOM2 + HET2_HOM1
        # = Σ x_i² + Σ x_j² - Σ x_i²·m_j - Σ m_i·x_j² - 2·Σ x_i·x_j (x = 0 where missing).
        xq, hq = q.clamp(min=0), _int8(q == 1)
        x2q = xq * xq
        acc.add("sq_q", _row_sums(x2q))
        acc.add("het_q", _row_sums(hq))
        x2q_e, hq_e, mq_e = cols(x2q), cols(hq), _int8(cols(mq))
        if symmetric:  # C + Cᵀ with C = X²·Mᵀ + X·Xᵀ
            left, right = torch.cat([x2q_e, xq], 1), torch.cat([mq_e, xq], 1)
            acc.add("cross", _int_products(left, right, 4))
            acc.add("het_miss_q", _int_products(hq_e, mq_e, 1))
        else:
            xa, ha = a.clamp(min=0), _int8(a == 1)
            x2a = xa * xa
            acc.add("sq_a", _row_sums(x2a))
            acc.add("het_a", _row_sums(ha))
            x2a_e, ha_e, ma_e = cols(x2a), cols(ha), _int8(cols(ma))
            left = torch.cat([x2q_e, mq_e, xq], 1)
            right = torch.cat([ma_e, x2a_e, 2 * xa], 1)
            acc.add("cross", _int_products(left, right, 8))
            # Hets of one sample where the other is called (HETHET + HET1_HOM2, and its mirror).
            acc.add("het_miss_q", _int_products(hq_e, ma_e, 1))
            acc.add("het_miss_a", _int_products(mq_e, ha_e, 1))
    elif metric == "ibs":
        # Σ |x_i - x_j| over variants called in both = Σ x_i + Σ x_j - Σ x_i·m_j - Σ m_i·x_j
        # - 2·Σ min(x_i, x_j), and min(x_i, x_j) = [x_i ≥ 1][x_j ≥ 1] + [x_i = 2][x_j = 2].
        xq = q.clamp(min=0)
        acc.add("sum_q", _row_sums(xq))
        g1q, g2q = _int8(q >= 1), _int8(q == 2)
        xq_e, mq_e = cols(xq), _int8(cols(mq))
        if symmetric:  # E + Eᵀ with E = X·Mᵀ + G1·G1ᵀ + G2·G2ᵀ
            left, right = torch.cat([xq_e, g1q, g2q], 1), torch.cat([mq_e, g1q, g2q], 1)
            acc.add("cross", _int_products(left, right, 2))
        else:
            xa = a.clamp(min=0)
            acc.add("sum_a", _row_sums(xa))
            g1a, g2a = _int8(a >= 1), _int8(a == 2)
            left = torch.cat([xq_e, mq_e, g1q, g2q], 1)
            right = torch.cat([_int8(cols(ma)), cols(xa), 2 * g1a, 2 * g2a], 1)
            acc.add("cross", _int_products(left, right, 2))
        both = torch.nonzero(missing_q & missing_a).flatten()
        _add_missing(acc, mq, ma, both, w, symmetric, offset)


def _finish(
    metric: Metric,
    acc: _Sums,
    shape: tuple[int, int],
    symmetric: bool,
    n_variants: int,
    w_total: float | None,
) -> torch.Tensor:
    def pair(name: str) -> torch.Tensor:  # Σ over i's variants + Σ over j's, as float64
        first = acc[f"{name}_q"].to(torch.float64)
        second = first if symmetric else acc[f"{name}_a"].to(torch.float64)
        return first[:, None] + second[None, :]

    def cross() -> torch.Tensor:
        c = acc["cross"]
        return (c + c.T if symmetric else c).to(torch.float64)

    def called_in_both() -> torch.Tensor:
        total = float(n_variants) if w_total is None else w_total
        den = total - pair("miss")
        if "joint" in acc:
            den += acc["joint"]
        if acc.sparse_q:
            a = acc.sparse_q if symmetric else acc.sparse_a
            den += _sparse_joint(acc.sparse_q, a, shape, n_variants)
        return den

    if metric == "grm":
        # plink2 --make-rel: Σ z_i z_j / (variants called in both), monomorphic ones included.
        num = _mirror(acc["num"]) if symmetric else acc["num"]
        return num.div_(called_in_both())
    if metric == "dot":
        return acc["num"].to(torch.float64) / n_variants
    if metric == "king":
        # plink2 ComputeKinship: 0.5 - (4·IBS0 + HET1_HOM2 + HET2_HOM1) / (4·(HETHET + min(...))),
        # and HETHET + HET1_HOM2 is the first sample's het count where the second is called.
        sq = pair("sq").sub_(cross())
        het_q = acc["het_q"][:, None] - acc["het_miss_q"]
        het_a = het_q.T if symmetric else acc["het_a"][None, :] - acc["het_miss_a"]
        return sq.div_(4.0 * torch.minimum(het_q, het_a).to(torch.float64)).neg_().add_(0.5)
    # plink 1.9 --distance ibs: the allele distance over jointly called variants, scaled by
    # (total weight) / (weight of jointly called variants), then IBS = 1 - dist / (2·M).
    total = float(n_variants) if w_total is None else w_total
    dist = pair("sum").sub_(cross())
    den = called_in_both()
    scale = torch.full_like(den, total).div_(den)  # a true division (torch's scalar / tensor
    return 1.0 - dist * scale / (2.0 * n_variants)  # multiplies by a reciprocal: 1 ulp off)


def pairwise_gemm(
    metric: Metric,
    query: np.ndarray,
    against: np.ndarray,
    p_all: np.ndarray | None,
    weights: np.ndarray | None,
    device: torch.device,
    spans: list[slice],
    chunk_codes: Callable[[np.ndarray, slice, str], np.ndarray],
) -> np.ndarray:
    """One metric between ``query`` and ``against`` (the same array: the square), chunk by chunk
    of variants (``spans``), on ``device``."""
    symmetric = against is query
    n_variants = query.shape[1]
    shape = (query.shape[0], against.shape[0])
    with torch.inference_mode():
        acc = _Sums(n_variants)
        for cols in spans:
            q = torch.from_numpy(chunk_codes(query, cols, "query")).to(device)
            if symmetric:
                a = q
            else:
                a = torch.from_numpy(chunk_codes(against, cols, "against")).to(device)
            p = None if p_all is None else torch.from_numpy(p_all[cols]).to(device)
            w = None if weights is None else torch.from_numpy(weights[cols]).to(device)
            _accumulate(metric, q, a, acc, p, w, cols.start)
        w_total = None if weights is None else float(weights.sum())
        return _finish(metric, acc, shape, symmetric, n_variants, w_total).cpu().numpy()
