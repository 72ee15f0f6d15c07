"""The CPU engine for ``grm``, ``king`` and ``ibs``: numpy, numba and BLAS, no torch.

KING and IBS (:mod:`models.genome_bits` explains the counts): the pair kernel counts two popcounts
per pair and 64 variants from each sample's ``het`` and ``hom`` bit planes, reading a missing call
as no copies, and finishes each pair in place: the per-pair corrections that take the missing calls
back out are written into the output slots beforehand, as four uint16 fields (KING) or two uint16
and one uint32 (IBS) in each float64 slot, so no N x N integer array is ever held:

- ``Hc(o→j)``: heterozygous calls of j at o's missing variants;
- ``W(o→j)``: Σ over o's missing variants of ``hom_weight·[x_j = 2] + [x_j = 1]``;
- ``joint``: the (weighted) count of variants both samples miss (IBS).

The corrections are computed per block of 64 samples: the block's planes are transposed to one
64-bit mask per variant, and each owner's missing variants add those masks into bit-sliced
counters (a Harley-Seal carry-save tree: about five logic operations per missing call and
plane, for 64 samples at once).

A square result is either a full (N, N) array, computed on and below the diagonal and mirrored,
or a packed lower triangle (N(N+1)/2 float64, half the memory) written out as the square by
:func:`write_square`.

GRM: the standardized genotypes of each variant chunk go through BLAS ``dsyrk`` (``dgemm`` for a
rectangle) straight into the float64 numerator, and the variants called in both samples come from
each variant's list of samples missing it. The same arithmetic as the GEMM engine, so KING and IBS
agree with it bit for bit and the GRM to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numba
import numpy as np
from numba import njit, prange

from models.genome_bits import _BLOCK, WORD, _pack, _popcount

#: Variants per chunk when building planes and standardized GRM blocks.
CHUNK = 1024
#: KING's fields are uint16: W(o→j) ≤ 4·(o's missing calls) must fit.
MAX_MISSING_KING = (2**16 - 1) // 4
#: IBS's W(o→j) ≤ 2·(o's missing calls).
MAX_MISSING_IBS = (2**16 - 1) // 2
#: PLINK 2's threshold below which 2p(1-p) makes a variant monomorphic (see models.genome).
_MONOMORPHIC_VARIANCE = 2.0**-44

_KING, _IBS = 0, 1


class TooManyMissing(ValueError):
    """A sample has more missing calls than the correction fields hold."""


# --- planes ------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _pack_variant_major(codes, het, hom, miss, word0):
    """Planes from one chunk of variant-major int8 codes (c, N), -1 missing, 64 samples at once."""
    c, n = codes.shape
    for block in prange((n + WORD - 1) // WORD):
        i0 = block * WORD
        lanes = min(WORD, n - i0)
        h = np.zeros(WORD, np.uint64)
        a = np.zeros(WORD, np.uint64)
        m = np.zeros(WORD, np.uint64)
        for w in range((c + WORD - 1) // WORD):
            h[:] = 0
            a[:] = 0
            m[:] = 0
            v0 = w * WORD
            for b in range(min(WORD, c - v0)):
                row = codes[v0 + b]
                shift = np.uint64(b)
                for lane in range(lanes):
                    x = row[i0 + lane]
                    h[lane] |= np.uint64(x == 1) << shift
                    a[lane] |= np.uint64(x == 2) << shift
                    m[lane] |= np.uint64(x < 0) << shift
            for lane in range(lanes):
                het[i0 + lane, word0 + w] = h[lane]
                hom[i0 + lane, word0 + w] = a[lane]
                miss[i0 + lane, word0 + w] = m[lane]


@njit(parallel=True, cache=True)
def _pack_missing(codes, miss, word0):
    """The missing-call plane from one chunk of sample-major codes (n, c)."""
    n, m = codes.shape
    for i in prange(n):
        for w in range((m + WORD - 1) // WORD):
            bits = np.uint64(0)
            start = w * WORD
            for b in range(min(WORD, m - start)):
                bits |= np.uint64(codes[i, start + b] < 0) << np.uint64(b)
            miss[i, word0 + w] = bits


@njit(parallel=True, cache=True)
def _missing_lists(miss):
    """CSR of each sample's missing variants (ascending, int32) from its missing-call plane."""
    n, words = miss.shape
    starts = np.zeros(n + 1, np.int64)
    for i in prange(n):
        k = 0
        for w in range(words):
            k += _popcount(miss[i, w])
        starts[i + 1] = k
    for i in range(n):
        starts[i + 1] += starts[i]
    variants = np.empty(starts[n], np.int32)
    for i in prange(n):
        k = starts[i]
        for w in range(words):
            bits = miss[i, w]
            while bits:
                low = bits & (~bits + np.uint64(1))
                variants[k] = w * WORD + _popcount(low - np.uint64(1))
                k += 1
                bits ^= low
    return starts, variants


@njit(cache=True)
def _by_variant(starts, variants, n_variants):
    """CSR of each variant's missing samples (ascending), from the per-sample lists."""
    n = starts.shape[0] - 1
    v_starts = np.zeros(n_variants + 1, np.int64)
    for t in range(variants.shape[0]):
        v_starts[variants[t] + 1] += 1
    for v in range(n_variants):
        v_starts[v + 1] += v_starts[v]
    fill = v_starts[:-1].copy()
    samples = np.empty(variants.shape[0], np.int32)
    for i in range(n):
        for t in range(starts[i], starts[i + 1]):
            v = variants[t]
            samples[fill[v]] = i
            fill[v] += 1
    return v_starts, samples


@dataclass
class Planes:
    """One side's calls as bit planes, with each sample's missing variants."""

    het: np.ndarray  # (N, words) uint64: one copy of A1
    hom: np.ndarray  # (N, words) uint64: two copies
    n_het: np.ndarray  # (N,) int64
    miss_starts: np.ndarray  # (N + 1,) int64
    miss_variants: np.ndarray  # int32, ascending within each sample
    n_variants: int

    @property
    def n(self) -> int:
        return int(self.het.shape[0])

    def max_missing(self) -> int:
        return int(np.diff(self.miss_starts).max()) if self.n else 0

    def n_missing(self, weights: np.ndarray | None) -> np.ndarray:
        """(N,) float64: missing calls, or the sum of their variants' weights."""
        counts = np.diff(self.miss_starts)
        if weights is None:
            return counts.astype(np.float64)
        owner = np.repeat(np.arange(self.n), counts)
        return np.bincount(owner, weights=weights[self.miss_variants], minlength=self.n)

    def by_variant(self) -> tuple[np.ndarray, np.ndarray]:
        return _by_variant(self.miss_starts, self.miss_variants, self.n_variants)


class PlaneBuilder:
    """Fills :class:`Planes` chunk by chunk (chunks start at multiples of 64 variants)."""

    def __init__(self, n: int, n_variants: int) -> None:
        words = max(1, -(-n_variants // WORD))
        self.n_variants = n_variants
        self.het = np.zeros((n, words), np.uint64)
        self.hom = np.zeros((n, words), np.uint64)
        self.miss = np.zeros((n, words), np.uint64)
        self._rows: np.ndarray | None = None

    def add_sample_major(self, codes: np.ndarray, start: int) -> None:
        """(N, c) int8 codes, -1 missing."""
        _pack(codes, self.het, self.hom, start // WORD)
        _pack_missing(codes, self.miss, start // WORD)

    def add_bed(self, raw: np.ndarray, start: int) -> None:
        """(c, ceil(N/4)) uint8 rows of a SNP-major .bed."""
        n = self.het.shape[0]
        words = 2 * -(-n // WORD)  # 16 bytes per 64 samples
        if self._rows is None or self._rows.shape[0] < raw.shape[0]:
            self._rows = np.zeros((raw.shape[0], words), np.uint64)
        rows = self._rows[: raw.shape[0]]
        rows.view(np.uint8)[:, : raw.shape[1]] = raw
        _pack_bed(rows, n, self.het, self.hom, self.miss, start // WORD)

    def add_variant_major(self, codes: np.ndarray, start: int) -> None:
        """(c, N) int8 codes, -1 missing."""
        _pack_variant_major(codes, self.het, self.hom, self.miss, start // WORD)

    def finish(self) -> Planes:
        starts, variants = _missing_lists(self.miss)
        del self.miss
        self._rows = None
        n_het = _row_popcounts(self.het)
        return Planes(self.het, self.hom, n_het, starts, variants, self.n_variants)


@njit(parallel=True, cache=True)
def _row_popcounts(planes):
    out = np.zeros(planes.shape[0], np.int64)
    for i in prange(planes.shape[0]):
        k = np.uint64(0)
        for w in range(planes.shape[1]):
            k += _popcount(planes[i, w])
        out[i] = k
    return out


# --- the .bed, decoded -------------------------------------------------------------------------


def _bed_table() -> np.ndarray:
    """Byte → 4 int8 codes (A1 dosage, -1 missing): .bed 00 = 2 copies, 10 = 1, 11 = 0, 01 = -1."""
    code = np.array([2, -1, 1, 0], dtype=np.int8)
    byte = np.arange(256)
    return np.stack([code[(byte >> (2 * k)) & 3] for k in range(4)], axis=1).astype(np.int8)


_BED_TABLE = _bed_table()


@njit(parallel=True, cache=True)
def _decode_bed(raw, table, n, out):
    """``out[v, :n]`` = the codes of variant v from its ``ceil(n/4)`` .bed bytes."""
    for v in prange(raw.shape[0]):
        row = raw[v]
        for b in range(n // 4):
            t = table[row[b]]
            out[v, 4 * b] = t[0]
            out[v, 4 * b + 1] = t[1]
            out[v, 4 * b + 2] = t[2]
            out[v, 4 * b + 3] = t[3]
        for i in range(4 * (n // 4), n):
            out[v, i] = table[row[i // 4], i % 4]


def iter_bed_raw(
    bed_path: str | Path, n: int, n_variants: int, chunk: int = CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, raw)``: the (c, ceil(n/4)) uint8 rows of a SNP-major .bed, chunk by chunk,
    read straight from the file (the whole matrix is never held)."""
    per_variant = (n + 3) // 4
    with open(bed_path, "rb") as handle:
        handle.seek(3)
        for start in range(0, n_variants, chunk):
            c = min(chunk, n_variants - start)
            raw = np.frombuffer(handle.read(c * per_variant), np.uint8)
            if raw.size != c * per_variant:
                raise ValueError(f"{bed_path}: truncated at variant {start}")
            yield start, raw.reshape(c, per_variant)


def iter_bed(
    bed_path: str | Path, n: int, n_variants: int, chunk: int = CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, codes)``: variant-major int8 codes (c, n), -1 missing, chunk by chunk."""
    out = np.empty((chunk, n), np.int8)
    for start, raw in iter_bed_raw(bed_path, n, n_variants, chunk):
        _decode_bed(raw, _BED_TABLE, n, out)
        yield start, out[: raw.shape[0]]


@njit(inline="always")
def _even_bits(x):
    """The 32 even-position bits of ``x``, packed into the low half (a software pext)."""
    x &= np.uint64(0x5555555555555555)
    x = (x | (x >> np.uint64(1))) & np.uint64(0x3333333333333333)
    x = (x | (x >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)


@njit(parallel=True, cache=True)
def _pack_bed(rows, n, het, hom, miss, word0):
    """Planes straight from .bed rows, as uint64 words (c, 2·ceil(n/64)): two words hold 64
    samples' 2-bit codes (00 two copies of A1, 10 one, 11 none, 01 missing). Each variant gives
    one 64-sample mask per plane; 64 of them are transposed into the samples' plane words."""
    c = rows.shape[0]
    low = np.uint64(0x5555555555555555)
    for block in prange((n + WORD - 1) // WORD):
        i0 = block * WORD
        lanes = min(WORD, n - i0)
        keep = (
            np.uint64(0xFFFFFFFFFFFFFFFF)
            if lanes == WORD
            else ((np.uint64(1) << np.uint64(lanes)) - np.uint64(1))
        )
        th = np.zeros(WORD, np.uint64)
        ta = np.zeros(WORD, np.uint64)
        tm = np.zeros(WORD, np.uint64)
        for w in range((c + WORD - 1) // WORD):
            th[:] = 0
            ta[:] = 0
            tm[:] = 0
            v0 = w * WORD
            for b in range(min(WORD, c - v0)):
                x0 = rows[v0 + b, 2 * block]
                x1 = rows[v0 + b, 2 * block + 1]
                lo0, hi0 = x0 & low, (x0 >> np.uint64(1)) & low
                lo1, hi1 = x1 & low, (x1 >> np.uint64(1)) & low
                th[b] = (_even_bits(hi0 & ~lo0) | (_even_bits(hi1 & ~lo1) << np.uint64(32))) & keep
                ta[b] = (
                    _even_bits(~(hi0 | lo0)) | (_even_bits(~(hi1 | lo1)) << np.uint64(32))
                ) & keep
                tm[b] = (_even_bits(lo0 & ~hi0) | (_even_bits(lo1 & ~hi1) << np.uint64(32))) & keep
            _transpose64(th)
            _transpose64(ta)
            _transpose64(tm)
            for lane in range(lanes):
                het[i0 + lane, word0 + w] = th[lane]
                hom[i0 + lane, word0 + w] = ta[lane]
                miss[i0 + lane, word0 + w] = tm[lane]


@njit(parallel=True, cache=True)
def _bed_counts(raw, n, called, alt):
    """Per variant of .bed rows: called samples and A1 copies."""
    for v in prange(raw.shape[0]):
        k = 0
        s = 0
        row = raw[v]
        for i in range(n):
            code = (row[i >> 2] >> ((i & 3) << 1)) & 3
            k += code != 1
            s += (code == 0) * 2 + (code == 2)
        called[v] = k
        alt[v] = s


# --- corrections -------------------------------------------------------------------------------


@njit(inline="always")
def _transpose64(a):
    """In place: bit c of row r ↔ bit r of row c (Hacker's Delight, 7-3, for 64 bits)."""
    j = 32
    m = np.uint64(0x00000000FFFFFFFF)
    while j != 0:
        k = 0
        while k < 64:
            t = ((a[k] >> np.uint64(j)) ^ a[k + j]) & m
            a[k + j] ^= t
            a[k] ^= t << np.uint64(j)
            k = (k + j + 1) & ~j
        j >>= 1
        m ^= m << np.uint64(j)


@njit(inline="always")
def _csa(a, b, c):
    """Carry-save adder of three bit vectors: (carry, sum)."""
    u = a ^ b
    return (a & b) | (u & c), u ^ c


@njit(inline="always")
def _ripple(levels, x, k):
    while x:
        t = levels[k] & x
        levels[k] ^= x
        x = t
        k += 1


@njit(inline="always")
def _count_masks(masks, variants, lo, hi, levels):
    """Bit-sliced per-lane counts of ``masks[variants[lo:hi]]`` into ``levels`` (zeroed)."""
    ones = np.uint64(0)
    twos = np.uint64(0)
    fours = np.uint64(0)
    t = lo
    while t + 8 <= hi:
        twos_a, ones = _csa(ones, masks[variants[t]], masks[variants[t + 1]])
        twos_b, ones = _csa(ones, masks[variants[t + 2]], masks[variants[t + 3]])
        fours_a, twos = _csa(twos, twos_a, twos_b)
        twos_a, ones = _csa(ones, masks[variants[t + 4]], masks[variants[t + 5]])
        twos_b, ones = _csa(ones, masks[variants[t + 6]], masks[variants[t + 7]])
        fours_b, twos = _csa(twos, twos_a, twos_b)
        eights, fours = _csa(fours, fours_a, fours_b)
        _ripple(levels, eights, 3)
        t += 8
    levels[0] = ones
    levels[1] = twos
    levels[2] = fours
    while t < hi:
        _ripple(levels, masks[variants[t]], 0)
        t += 1


@njit(inline="always")
def _lane_values(levels, out):
    """Each lane's count from the bit-sliced levels."""
    top = levels.shape[0]
    while top > 0 and levels[top - 1] == 0:
        top -= 1
    out[:] = 0
    for k in range(top):
        word = levels[k]
        for lane in range(WORD):
            out[lane] |= np.int64((word >> np.uint64(lane)) & np.uint64(1)) << k


@njit(inline="always")
def _slot(r, c, n_cols, packed):
    if packed:
        return r * (r + 1) // 2 + c
    return r * n_cols + c


@njit(parallel=True, cache=True)
def _corrections(
    own_starts, own_vars, blk_het, blk_hom, hom_weight, hc, w_field, mode, n_cols, packed, fields
):
    """Write ``W(o→j)`` (and ``Hc(o→j)`` when ``hc``) for every owner o and block-side sample j.

    ``mode`` 0: one cohort against itself, slot (max, min), owner = row → fields 0/2, else 1/3
    (IBS: W in field ``w_field`` + 0/1). ``mode`` 1: owners are the query rows (slot (o, j),
    owner fields 0/2); ``mode`` 2: owners are the cohort columns (slot (j, o), fields 1/3).
    """
    n_owners = own_starts.shape[0] - 1
    n_blk, words = blk_het.shape
    for block in prange((n_blk + WORD - 1) // WORD):
        j0 = block * WORD
        lanes = min(WORD, n_blk - j0)
        hv = np.zeros(words * WORD, np.uint64)
        av = np.zeros(words * WORD, np.uint64)
        tile = np.zeros(WORD, np.uint64)
        for w in range(words):
            tile[:] = 0
            for lane in range(lanes):
                tile[lane] = blk_het[j0 + lane, w]
            _transpose64(tile)
            hv[w * WORD : (w + 1) * WORD] = tile
            tile[:] = 0
            for lane in range(lanes):
                tile[lane] = blk_hom[j0 + lane, w]
            _transpose64(tile)
            av[w * WORD : (w + 1) * WORD] = tile
        lh = np.zeros(24, np.uint64)
        la = np.zeros(24, np.uint64)
        vh = np.zeros(WORD, np.int64)
        va = np.zeros(WORD, np.int64)
        for o in range(n_owners):
            lo = own_starts[o]
            hi = own_starts[o + 1]
            if lo == hi:
                continue
            lh[:] = 0
            la[:] = 0
            _count_masks(hv, own_vars, lo, hi, lh)
            _count_masks(av, own_vars, lo, hi, la)
            _lane_values(lh, vh)
            _lane_values(la, va)
            for lane in range(lanes):
                j = j0 + lane
                if mode == 0:
                    if j == o:
                        continue
                    row_owner = o > j
                    slot = _slot(max(o, j), min(o, j), n_cols, packed)
                    side = 0 if row_owner else 1
                elif mode == 1:
                    slot = _slot(o, j, n_cols, False)
                    side = 0
                else:
                    slot = _slot(j, o, n_cols, False)
                    side = 1
                if hc:
                    fields[4 * slot + side] = vh[lane]
                fields[4 * slot + w_field + side] = hom_weight * va[lane] + vh[lane]


@njit(parallel=True, cache=True)
def _joint_counts(q_starts, q_samples, a_starts, a_samples, weights, symmetric, packed, n_cols,
                  threads, out):  # fmt: skip
    """``out[slot(i, j)] += weight[v]`` for every variant v both i and j miss (i > j when
    ``symmetric``). Threads own interleaved rows, so no two write the same slot."""
    for part in prange(threads):
        for v in range(q_starts.shape[0] - 1):
            w = weights[v]
            for t in range(q_starts[v], q_starts[v + 1]):
                i = q_samples[t]
                if i % threads != part:
                    continue
                if symmetric:
                    for u in range(q_starts[v], t):
                        out[_slot(i, q_samples[u], n_cols, packed)] += w
                else:
                    for u in range(a_starts[v], a_starts[v + 1]):
                        out[_slot(i, a_samples[u], n_cols, False)] += w


# --- the pair kernel, finished in place --------------------------------------------------------


@njit(fastmath=True, inline="always")
def _pair2(hi, ai, hj, aj, hk, ak):
    """(IBS0', HETHET) of row i against rows j and k, over all words."""
    z = np.uint64(0)
    ibs0_j, hh_j, ibs0_k, hh_k = z, z, z, z
    for w in range(hi.shape[0]):
        h = hi[w]
        a = ai[w]
        none_i = ~(h | a)
        ibs0_j += _popcount((a & ~(hj[w] | aj[w])) | (none_i & aj[w]))
        hh_j += _popcount(h & hj[w])
        ibs0_k += _popcount((a & ~(hk[w] | ak[w])) | (none_i & ak[w]))
        hh_k += _popcount(h & hk[w])
    return np.int64(ibs0_j), np.int64(hh_j), np.int64(ibs0_k), np.int64(hh_k)


@njit(inline="always", error_model="numpy")
def _finish(metric, ibs0, hethet, nh_i, nh_j, f16, f32, slot, own_i, nm_i, nm_j, total, n_var):
    """The metric of one pair from its counts and its slot's correction fields (``own_i``: the
    field index of owner i; owner j's is ``1 - own_i``)."""
    if metric == _KING:
        d = 4 * ibs0 - 2 * hethet + nh_i + nh_j - f16[4 * slot + 2] - f16[4 * slot + 3]
        het_ij = nh_i - np.int64(f16[4 * slot + 1 - own_i])  # i's hets where j is called
        het_ji = nh_j - np.int64(f16[4 * slot + own_i])
        return 0.5 - np.float64(d) / (4.0 * np.float64(min(het_ij, het_ji)))
    d = 2 * ibs0 - 2 * hethet + nh_i + nh_j - f16[4 * slot] - f16[4 * slot + 1]
    den = (total - (nm_i + nm_j)) + np.float64(f32[2 * slot + 1])
    return 1.0 - np.float64(d) * (total / den) / (2.0 * n_var)


@njit(parallel=True, cache=True, error_model="numpy")
def _pairs_square(metric, het, hom, n_het, n_miss, total, n_var, packed, out, f16, f32):
    """Every pair i < j of one cohort, finished into slot (j, i); blocks of cohort rows j run in
    parallel and meet each earlier row i two at a time."""
    n = het.shape[0]
    for block in prange((n + _BLOCK - 1) // _BLOCK):
        j0 = block * _BLOCK
        j1 = min(n, j0 + _BLOCK)
        for i in range(j1 - 1):
            hi = het[i]
            ai = hom[i]
            for j in range(max(j0, i + 1), j1, 2):
                k = min(j + 1, j1 - 1)
                ibs0_j, hh_j, ibs0_k, hh_k = _pair2(hi, ai, het[j], hom[j], het[k], hom[k])
                s = _slot(j, i, n, packed)
                value = _finish(metric, ibs0_j, hh_j, n_het[i], n_het[j], f16, f32, s, 1,
                                n_miss[i], n_miss[j], total, n_var)  # fmt: skip
                out[s] = value
                if k != j:
                    s = _slot(k, i, n, packed)
                    value = _finish(metric, ibs0_k, hh_k, n_het[i], n_het[k], f16, f32, s, 1,
                                    n_miss[i], n_miss[k], total, n_var)  # fmt: skip
                    out[s] = value


@njit(parallel=True, cache=True, error_model="numpy")
def _pairs_rect(metric, het_q, hom_q, het_a, hom_a, nh_q, nh_a, nm_q, nm_a, total, n_var, out,
                f16, f32):  # fmt: skip
    """Every query row i against every cohort column j, finished into slot (i, j)."""
    n_q = het_q.shape[0]
    n_a = het_a.shape[0]
    for block in prange((n_a + _BLOCK - 1) // _BLOCK):
        j0 = block * _BLOCK
        j1 = min(n_a, j0 + _BLOCK)
        for i in range(n_q):
            hi = het_q[i]
            ai = hom_q[i]
            for j in range(j0, j1, 2):
                k = min(j + 1, j1 - 1)
                ibs0_j, hh_j, ibs0_k, hh_k = _pair2(hi, ai, het_a[j], hom_a[j], het_a[k], hom_a[k])
                s = i * n_a + j
                out[s] = _finish(metric, ibs0_j, hh_j, nh_q[i], nh_a[j], f16, f32, s, 0,
                                 nm_q[i], nm_a[j], total, n_var)  # fmt: skip
                if k != j:
                    s = i * n_a + k
                    out[s] = _finish(metric, ibs0_k, hh_k, nh_q[i], nh_a[k], f16, f32, s, 0,
                                     nm_q[i], nm_a[k], total, n_var)  # fmt: skip


@njit(parallel=True, cache=True)
def _set_diagonal(out, n, packed, value):
    for i in prange(n):
        out[_slot(i, i, n, packed)] = value


@njit(parallel=True, cache=True)
def _mirror_lower(out):
    """Copy the lower triangle of a square C-order array onto its upper one, in tiles."""
    n = out.shape[0]
    for block in prange((n + 63) // 64):
        r0 = block * 64
        for c0 in range(0, r0 + 64, 64):
            for r in range(r0, min(n, r0 + 64)):
                for c in range(c0, min(r, c0 + 64)):
                    out[c, r] = out[r, c]


def counts_metric(
    metric: str,
    query: Planes,
    against: Planes | None,
    *,
    weights: np.ndarray | None = None,
    packed: bool = False,
) -> np.ndarray:
    """KING or IBS (``metric``) from planes: ``against=None`` for a cohort against itself.

    Returns (N_q, N_a) float64, or with ``packed`` (square only) the lower triangle, row by row.
    Raises :class:`TooManyMissing` when a sample has more missing calls than the uint16 fields
    hold (the caller then takes :class:`models.genome_bits.Counter`).
    """
    code = _KING if metric == "king" else _IBS
    hom_weight = 4 if code == _KING else 2
    limit = MAX_MISSING_KING if code == _KING else MAX_MISSING_IBS
    sides = [query] if against is None else [query, against]
    if max(side.max_missing() for side in sides) > limit:
        raise TooManyMissing(f"a sample misses more than {limit} calls")
    n_var = query.n_variants
    total = float(n_var) if weights is None else float(weights.sum())
    w = np.ones(n_var, np.uint32) if weights is None else weights.astype(np.uint32)
    threads = numba.get_num_threads()
    if against is None:
        n = query.n
        out = np.zeros(n * (n + 1) // 2 if packed else n * n, np.float64)
        f16, f32 = out.view(np.uint16), out.view(np.uint32)
        _corrections(query.miss_starts, query.miss_variants, query.het, query.hom, hom_weight,
                     code == _KING, 2 if code == _KING else 0, 0, n, packed, f16)  # fmt: skip
        nm = query.n_missing(weights)
        if code == _IBS:
            v_starts, v_samples = query.by_variant()
            _joint_counts(v_starts, v_samples, v_starts, v_samples, w, True, packed, n, threads,
                          f32[1::2])  # fmt: skip
        _pairs_square(code, query.het, query.hom, query.n_het, nm, total, float(n_var), packed,
                      out, f16, f32)  # fmt: skip
        _set_diagonal(out, n, packed, 0.5 if code == _KING else 1.0)
        if packed:
            return out
        square = out.reshape(n, n)
        _mirror_lower(square)
        return square
    n_q, n_a = query.n, against.n
    out = np.zeros(n_q * n_a, np.float64)
    f16, f32 = out.view(np.uint16), out.view(np.uint32)
    is_king = code == _KING
    w_field = 2 if is_king else 0
    _corrections(query.miss_starts, query.miss_variants, against.het, against.hom, hom_weight,
                 is_king, w_field, 1, n_a, False, f16)  # fmt: skip
    _corrections(against.miss_starts, against.miss_variants, query.het, query.hom, hom_weight,
                 is_king, w_field, 2, n_a, False, f16)  # fmt: skip
    if code == _IBS:
        q_starts, q_samples = query.by_variant()
        a_starts, a_samples = against.by_variant()
        _joint_counts(q_starts, q_samples, a_starts, a_samples, w, False, False, n_a, threads,
                      f32[1::2])  # fmt: skip
    _pairs_rect(code, query.het, query.hom, against.het, against.hom, query.n_het, against.n_het,
                query.n_missing(weights), against.n_missing(weights), total, float(n_var), out,
                f16, f32)  # fmt: skip
    return out.reshape(n_q, n_a)


# --- the GRM -----------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _variant_counts(codes, variant_major, called, alt):
    """Per variant of one chunk: called samples and A1 copies (``codes`` (c, N) or (N, c))."""
    c = codes.shape[0] if variant_major else codes.shape[1]
    n = codes.shape[1] if variant_major else codes.shape[0]
    for v in prange(c):
        k = 0
        s = 0
        for i in range(n):
            x = codes[v, i] if variant_major else codes[i, v]
            if x >= 0:
                k += 1
                s += x
        called[v] = k
        alt[v] = s


def bed_frequencies(bed_path: str | Path, n: int, n_variants: int) -> np.ndarray:
    """A1 frequency over observed calls per variant (NaN without calls), from the .bed's bytes."""
    called = np.zeros(n_variants, np.int64)
    alt = np.zeros(n_variants, np.int64)
    for start, raw in iter_bed_raw(bed_path, n, n_variants):
        c = raw.shape[0]
        _bed_counts(raw, n, called[start : start + c], alt[start : start + c])
    with np.errstate(invalid="ignore", divide="ignore"):
        return alt / (2.0 * called)


@njit(parallel=True, cache=True)
def _standardize(codes, variant_major, mean2, scale, zt, missing):
    """``zt[v, i] = (x - 2p)·scale`` for called x, 0 for missing (``missing[v, i]`` set)."""
    c = zt.shape[0]
    n = zt.shape[1]
    if variant_major:
        for v in prange(c):
            for i in range(n):
                x = codes[v, i]
                zt[v, i] = (np.float64(x) - mean2[v]) * scale[v] if x >= 0 else 0.0
                missing[v, i] = x < 0
    else:
        for i0 in prange((n + 63) // 64):
            for v0 in range(0, c, 64):
                for i in range(i0 * 64, min(n, i0 * 64 + 64)):
                    for v in range(v0, min(c, v0 + 64)):
                        x = codes[i, v]
                        zt[v, i] = (np.float64(x) - mean2[v]) * scale[v] if x >= 0 else 0.0
                        missing[v, i] = x < 0


@njit(cache=True)
def _missing_csr(missing):
    """CSR of each variant's missing samples from a (c, N) bool matrix."""
    c, n = missing.shape
    starts = np.zeros(c + 1, np.int64)
    for v in range(c):
        starts[v + 1] = starts[v] + missing[v].sum()
    samples = np.empty(starts[c], np.int32)
    for v in range(c):
        k = starts[v]
        for i in range(n):
            if missing[v, i]:
                samples[k] = i
                k += 1
    return starts, samples


@njit(parallel=True, cache=True)
def _joint_upper(starts, samples, threads, out):
    """``out[i, j] += 1`` (i < j) for every variant both miss; threads own interleaved rows."""
    for part in prange(threads):
        for v in range(starts.shape[0] - 1):
            for t in range(starts[v], starts[v + 1]):
                i = samples[t]
                if i % threads != part:
                    continue
                for u in range(t + 1, starts[v + 1]):
                    out[i, samples[u]] += 1.0


@njit(parallel=True, cache=True)
def _grm_finish_square(out, n_missing, total):
    """Numerator below the diagonal, joint-missing counts above: the GRM, mirrored."""
    n = out.shape[0]
    for r in prange(n):
        for c in range(r):
            den = (total - (n_missing[r] + n_missing[c])) + out[c, r]
            value = out[r, c] / den
            out[r, c] = value
            out[c, r] = value
        out[r, r] = out[r, r] / ((total - (n_missing[r] + n_missing[r])) + n_missing[r])


def _standardizer(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2p, 1/sqrt(2p(1-p)) or 0 where monomorphic), as the GEMM engine computes them."""
    variance = 2.0 * p * (1.0 - p)
    with np.errstate(invalid="ignore", divide="ignore"):
        usable = variance >= _MONOMORPHIC_VARIANCE
        scale = np.where(usable, 1.0 / np.sqrt(np.where(usable, variance, 1.0)), 0.0)
    return 2.0 * p, scale


def check_monomorphic(codes: np.ndarray, p: np.ndarray, offset: int, variant_major: bool) -> None:
    """PLINK 2 stops on a variant its frequencies call monomorphic whose calls vary."""
    flat = np.flatnonzero(2.0 * p * (1.0 - p) < _MONOMORPHIC_VARIANCE)
    if not flat.size:
        return
    calls = codes[flat] if variant_major else codes[:, flat].T
    expected = np.round(2.0 * p[flat]).astype(np.int8)[:, None]
    wrong = ((calls >= 0) & (calls != expected)).any(axis=1)
    if wrong.any():
        j = offset + int(flat[np.flatnonzero(wrong)[0]])
        raise ValueError(f"variant {j}: the frequencies call it monomorphic but its calls vary")


def grm_square(
    chunks: Iterator[tuple[int, np.ndarray]],
    n: int,
    p: np.ndarray,
    *,
    variant_major: bool,
) -> np.ndarray:
    """plink2 --make-rel square from chunks of codes ((c, N) when ``variant_major``, else (N, c)):
    ``dsyrk`` into the lower triangle, jointly missing counts in the upper, then divided."""
    from scipy.linalg import blas  # loaded for the GRM only (17 MB resident)

    out = np.zeros((n, n), np.float64)
    n_missing = np.zeros(n, np.float64)
    threads = numba.get_num_threads()
    for start, codes in chunks:
        c = codes.shape[0] if variant_major else codes.shape[1]
        pc = p[start : start + c]
        check_monomorphic(codes, pc, start, variant_major)
        mean2, scale = _standardizer(pc)
        zt = np.empty((c, n), np.float64)
        missing = np.empty((c, n), np.bool_)
        _standardize(codes, variant_major, mean2, scale, zt, missing)
        # out.T is Fortran-ordered: its upper triangle is out's lower one.
        blas.dsyrk(1.0, zt.T, beta=1.0, c=out.T, trans=0, lower=0, overwrite_c=1)
        del zt
        starts, samples = _missing_csr(missing)
        n_missing += missing.sum(axis=0)
        _joint_upper(starts, samples, threads, out)
    _grm_finish_square(out, n_missing, float(len(p)))
    return out


@njit(parallel=True, cache=True)
def _joint_rect(q_starts, q_samples, a_starts, a_samples, threads, out):
    for part in prange(threads):
        for v in range(q_starts.shape[0] - 1):
            for t in range(q_starts[v], q_starts[v + 1]):
                i = q_samples[t]
                if i % threads != part:
                    continue
                for u in range(a_starts[v], a_starts[v + 1]):
                    out[i, a_samples[u]] += 1.0


def grm_block(
    query: Iterator[tuple[int, np.ndarray]],
    against: Iterator[tuple[int, np.ndarray]],
    n_q: int,
    n_a: int,
    p: np.ndarray,
) -> np.ndarray:
    """The GRM between two sample sets from aligned chunks of sample-major codes: ``dgemm``."""
    from scipy.linalg import blas

    num = np.zeros((n_q, n_a), np.float64)
    joint = np.zeros((n_q, n_a), np.float64)
    miss_q = np.zeros(n_q, np.float64)
    miss_a = np.zeros(n_a, np.float64)
    for (start, q), (_, a) in zip(query, against, strict=True):
        c = q.shape[1]
        pc = p[start : start + c]
        check_monomorphic(q, pc, start, False)
        check_monomorphic(a, pc, start, False)
        mean2, scale = _standardizer(pc)
        zq, mq = np.empty((c, n_q)), np.empty((c, n_q), np.bool_)
        za, ma = np.empty((c, n_a)), np.empty((c, n_a), np.bool_)
        _standardize(q, False, mean2, scale, zq, mq)
        _standardize(a, False, mean2, scale, za, ma)
        # num.T (Fortran) += Z_a Z_qᵀ
        blas.dgemm(1.0, za.T, zq.T, beta=1.0, c=num.T, trans_b=1, overwrite_c=1)
        miss_q += mq.sum(axis=0)
        miss_a += ma.sum(axis=0)
        q_starts, q_samples = _missing_csr(mq)
        a_starts, a_samples = _missing_csr(ma)
        _joint_rect(q_starts, q_samples, a_starts, a_samples, numba.get_num_threads(), joint)
    total = float(len(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        den = total - (miss_q[:, None] + miss_a[None, :])
        den += joint
        return num / den


# --- writing -----------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _rows_from_packed(tri, n, r0, buf):
    for r in prange(r0, r0 + buf.shape[0]):
        row = buf[r - r0]
        base = r * (r + 1) // 2
        for c in range(r + 1):
            row[c] = tri[base + c]
        for c in range(r + 1, n):
            row[c] = tri[c * (c + 1) // 2 + r]


def write_square(tri: np.ndarray, n: int, sink: BinaryIO, rows: int = 256) -> None:
    """Write a packed lower triangle as the full square, little-endian float64, row by row."""
    buf = np.empty((min(rows, max(n, 1)), n), np.float64)
    for r0 in range(0, n, rows):
        part = buf[: min(rows, n - r0)]
        _rows_from_packed(tri, n, r0, part)
        sink.write(part.astype("<f8", copy=False).tobytes())
