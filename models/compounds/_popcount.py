"""The popcount engine of :mod:`models.compounds.chem`: shared bits as AND + popcount on packed uint64 words.

A fingerprint of ``n_bits`` bits is ``W`` uint64 words, zero-padded to a multiple of 8 (a zero
word adds nothing to a count). The shared-bit count of a query and a library molecule is
``c = Σ_w popcount(q[w] & l[w])``: 32 words at 2,048 bits, where a GEMM of 0/1 matrices spends
2,048 multiply-adds.

Searches (:func:`top_k`, :func:`threshold`) keep the library sorted by popcount and count only
what two bounds let through:

- Swamidass-Baldi, ``c ≤ min(a, b)``: a query of popcount ``a`` meets only the library rows whose
  popcount lies in the window where ``min(a, b) / max(a, b)`` (Tanimoto; Dice ``2 min / (a + b)``)
  reaches the threshold or the query's current k-th best score; one contiguous run of rows.
- the segment bound ``c ≤ Σ_s min(a_s, b_s)`` over the popcounts of 64-bit (coarse) or 32-bit
  (fine) segments, stored as uint8 for 64 library rows side by side, so one vector
  ``min`` + saturating ``add`` per segment bounds 64 pairs (:func:`_bound64`). It is compared
  with a cut a little under the smallest count that can reach the score sought.

The rows it lets through are counted exactly (:func:`_count1`, 8 words a vector) and scored as
RDKit scores, in float64 (numba compiles IEEE division; no fastmath here). The full matrix
(:func:`similarity`) counts 8 library rows at once from a word-interleaved layout
(:func:`_count8`: a broadcast query word against word ``w`` of 8 rows, no horizontal sum).

The inner loops are LLVM IR on ``<8 x i64>`` and ``<64 x i8>`` vectors (``llvm.ctpop``,
``llvm.umin``, ``llvm.uadd.sat``), which LLVM lowers for the CPU numba compiles for:
``vpopcntq`` on 512-bit registers with AVX-512 VPOPCNTDQ (Intel Ice Lake and later, AMD Zen 4),
a ``vpshufb`` nibble table with AVX2, ``cnt`` on ARM (:func:`kernel_assembly` shows the code for
any target; the tests check it).

For cache reuse, queries run in groups of similar popcount (:data:`GROUP` at a time) through
chunks of the library (:data:`CHUNK_BYTES`); top-k visits the chunks outwards from the group's
popcount, so the k-th best scores rise early and windows and cuts tighten. Groups are spread
over ``numba.get_num_threads()`` Python threads calling ``nogil`` kernels (each writes its own
queries' rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import llvmlite.ir as ir
import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Library molecules per interleaved block: one 512-bit vector of uint64 counts.
LANES = 8
#: Library molecules per block of the word-popcount bound: one 512-bit vector of uint8.
BOUND_LANES = 64
#: Rows of 64 the coarse segment bound may let through before the fine one takes over.
_FINE_AFTER = 6
#: Queries per group (sorted by popcount): they share each library chunk while it is in cache.
#: Each group reads the whole library (its segment popcounts and the candidate rows) from L3 or
#: memory once, so large groups: top-10 of 1,000 MOSES queries in 100,000 took 0.46 s on one
#: thread in groups of 16, 0.36 s in groups of 32, 0.19 s in groups of 256 (no gain beyond).
GROUP = 256
#: Bytes of 64-bit segment popcounts per chunk a group works through (512 rows at 2,048 bits:
#: 128 KB of words, 16 KB + 32 KB of segment popcounts, in L2); 8 to 128 KB made little
#: difference.
CHUNK_BYTES = 16 * 1024
#: Relative slack on the integer count cut, far above float64 rounding, far below the gap between
#: two scores (≥ 1/n_bits²); the exact check removes what it lets through.
_CUT_SLACK = 1e-6
_NO_INDEX = np.iinfo(np.int64).max

T = TypeVar("T")


# --- the inner loop, as LLVM IR -----------------------------------------------------------------


def _emit_count8(
    builder: ir.IRBuilder, q: ir.Value, t: ir.Value, n_words: ir.Value, cut: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """IR for the 8 counts ``Σ_w ctpop(q[w] & t[8w + l])`` and the i64 bitmask of ``count >= cut``.

    ``q`` and ``t`` are ``i64*``; ``n_words`` and ``cut`` are i64.
    """
    i64 = ir.IntType(64)
    vec = ir.VectorType(i64, LANES)
    ctpop = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec]), f"llvm.ctpop.v{LANES}i64"
    )
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
    undef = ir.Constant(vec, ir.Undefined)
    acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
    with cgutils.for_range(builder, n_words) as loop:
        word = builder.load(builder.gep(q, [loop.index]))
        splat = builder.shuffle_vector(
            builder.insert_element(undef, word, ir.Constant(ir.IntType(32), 0)), undef, zeros
        )
        row = builder.gep(t, [builder.mul(loop.index, ir.Constant(i64, LANES))])
        lanes = builder.load(builder.bitcast(row, vec.as_pointer()), align=8)
        total = builder.add(builder.load(acc), builder.call(ctpop, [builder.and_(splat, lanes)]))
        builder.store(total, acc)
    counts = builder.load(acc)
    cut_v = builder.shuffle_vector(
        builder.insert_element(undef, cut, ir.Constant(ir.IntType(32), 0)), undef, zeros
    )
    hit = builder.icmp_signed(">=", counts, cut_v)
    mask = builder.zext(builder.bitcast(hit, ir.IntType(LANES)), i64)
    return counts, mask


def _count8_ir(typingctx: Any, q: Any, q0: Any, t: Any, t0: Any, n_words: Any, cut: Any, out: Any):
    """``out[:8]`` = the shared-bit counts of query words ``q[q0 : q0 + n_words]`` with the
    interleaved block at ``t[t0 :]``; returns the bitmask of the lanes whose count is ``>= cut``."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Sequence[ir.Value]) -> Any:
        q_arr = context.make_array(sig.args[0])(context, builder, args[0])
        t_arr = context.make_array(sig.args[2])(context, builder, args[2])
        out_arr = context.make_array(sig.args[6])(context, builder, args[6])
        q_ptr = builder.gep(q_arr.data, [args[1]])
        t_ptr = builder.gep(t_arr.data, [args[3]])
        counts, mask = _emit_count8(builder, q_ptr, t_ptr, args[4], args[5])
        builder.store(counts, builder.bitcast(out_arr.data, counts.type.as_pointer()), align=8)
        return mask

    return types.int64(q, types.int64, t, types.int64, types.int64, types.int64, out), codegen


_count8: Any = intrinsic(_count8_ir)


def _emit_bound64(
    builder: ir.IRBuilder, q: ir.Value, t: ir.Value, n_words: ir.Value, cut: ir.Value
) -> ir.Value:
    """IR for the i64 bitmask of the 64 lanes whose ``Σ_w min(q[w], t[64w + l])`` (uint8,
    saturating at 255) is ``>= cut`` (1..255); ``q``, ``t`` are ``i8*`` word popcounts."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    vec = ir.VectorType(i8, BOUND_LANES)
    umin = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec, vec]), f"llvm.umin.v{BOUND_LANES}i8"
    )
    uadd_sat = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec, vec]), f"llvm.uadd.sat.v{BOUND_LANES}i8"
    )
    zeros = ir.Constant(ir.VectorType(i32, BOUND_LANES), [0] * BOUND_LANES)
    undef = ir.Constant(vec, ir.Undefined)
    acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
    with cgutils.for_range(builder, n_words) as loop:
        count = builder.load(builder.gep(q, [loop.index]))
        splat = builder.shuffle_vector(
            builder.insert_element(undef, count, ir.Constant(i32, 0)), undef, zeros
        )
        row = builder.gep(t, [builder.mul(loop.index, ir.Constant(loop.index.type, BOUND_LANES))])
        lanes = builder.load(builder.bitcast(row, vec.as_pointer()), align=1)
        builder.store(
            builder.call(uadd_sat, [builder.load(acc), builder.call(umin, [splat, lanes])]), acc
        )
    cut_v = builder.shuffle_vector(
        builder.insert_element(undef, builder.trunc(cut, i8), ir.Constant(i32, 0)), undef, zeros
    )
    hit = builder.icmp_unsigned(">=", builder.load(acc), cut_v)
    return builder.bitcast(hit, ir.IntType(BOUND_LANES))


def _bound64_ir(typingctx: Any, q: Any, q0: Any, t: Any, t0: Any, n_words: Any, cut: Any):
    """Bitmask of the 64 library rows of the block at ``t[t0:]`` (word popcounts, interleaved)
    that the word-by-word bound lets through for the query word popcounts ``q[q0:]``."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Sequence[ir.Value]) -> Any:
        q_arr = context.make_array(sig.args[0])(context, builder, args[0])
        t_arr = context.make_array(sig.args[2])(context, builder, args[2])
        q_ptr = builder.gep(q_arr.data, [args[1]])
        t_ptr = builder.gep(t_arr.data, [args[3]])
        return _emit_bound64(builder, q_ptr, t_ptr, args[4], args[5])

    return types.int64(q, types.int64, t, types.int64, types.int64, types.int64), codegen


_bound64: Any = intrinsic(_bound64_ir)


def _emit_count1(builder: ir.IRBuilder, q: ir.Value, t: ir.Value, n_vectors: ir.Value) -> ir.Value:
    """IR for ``Σ ctpop(q[w] & t[w])`` over ``8 · n_vectors`` words (``i64*`` each)."""
    i64 = ir.IntType(64)
    vec = ir.VectorType(i64, LANES)
    ctpop = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec]), f"llvm.ctpop.v{LANES}i64"
    )
    reduce_add = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(i64, [vec]), f"llvm.vector.reduce.add.v{LANES}i64"
    )
    acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
    with cgutils.for_range(builder, n_vectors) as loop:
        offset = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
        qv = builder.load(builder.bitcast(builder.gep(q, [offset]), vec.as_pointer()), align=8)
        tv = builder.load(builder.bitcast(builder.gep(t, [offset]), vec.as_pointer()), align=8)
        builder.store(
            builder.add(builder.load(acc), builder.call(ctpop, [builder.and_(qv, tv)])), acc
        )
    return builder.call(reduce_add, [builder.load(acc)])


def _count1_ir(typingctx: Any, q: Any, q0: Any, t: Any, t0: Any, n_words: Any):
    """The shared-bit count of the rows at ``q[q0:]`` and ``t[t0:]``, ``n_words`` words (a
    multiple of 8) each."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Sequence[ir.Value]) -> Any:
        q_arr = context.make_array(sig.args[0])(context, builder, args[0])
        t_arr = context.make_array(sig.args[2])(context, builder, args[2])
        q_ptr = builder.gep(q_arr.data, [args[1]])
        t_ptr = builder.gep(t_arr.data, [args[3]])
        n_vectors = builder.udiv(args[4], ir.Constant(ir.IntType(64), LANES))
        return _emit_count1(builder, q_ptr, t_ptr, n_vectors)

    return types.int64(q, types.int64, t, types.int64, types.int64), codegen


_count1: Any = intrinsic(_count1_ir)


def _cttz_ir(typingctx: Any, x: Any):
    """The index of the lowest set bit of an int64 (LLVM's cttz: ``tzcnt`` / ``rbit``+``clz``)."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Sequence[ir.Value]) -> Any:
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64"
        )
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return types.int64(types.int64), codegen


_cttz: Any = intrinsic(_cttz_ir)


def _ctpop_ir(typingctx: Any, x: Any):
    """The number of set bits of an int64 (LLVM's ctpop)."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Sequence[ir.Value]) -> Any:
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64"
        )
        return builder.call(fn, [args[0]])

    return types.int64(types.int64), codegen


_ctpop: Any = intrinsic(_ctpop_ir)


def count8_assembly(triple: str = "", cpu: str = "", features: str = "") -> str:
    """The machine code LLVM makes of :func:`_count8`'s loop for a target (default: this CPU,
    as numba compiles it), to check which popcount instruction it uses."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()  # numba initialises only the host's
    llvm.initialize_all_asmprinters()
    i64 = ir.IntType(64)
    module = ir.Module(name="count8")
    fn = ir.Function(
        module, ir.FunctionType(i64, [i64.as_pointer(), i64.as_pointer(), i64, i64]), "count8"
    )
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    counts, mask = _emit_count8(builder, fn.args[0], fn.args[1], fn.args[2], fn.args[3])
    builder.store(counts, builder.bitcast(fn.args[0], counts.type.as_pointer()))
    builder.ret(mask)
    triple = triple or llvm.get_process_triple()
    if not cpu:
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    parsed = llvm.parse_assembly(str(module))
    machine = llvm.Target.from_triple(triple).create_target_machine(
        cpu=cpu, features=features, opt=3
    )
    parsed.triple = triple
    tuning = llvm.PipelineTuningOptions(speed_level=3)
    passes = llvm.create_pass_builder(machine, tuning)
    passes.getModulePassManager().run(parsed, passes)
    return str(machine.emit_assembly(parsed))


def kernel_assembly(triple: str = "", cpu: str = "", features: str = "") -> str:
    """The machine code LLVM makes of the three inner loops (:func:`_count8`,
    :func:`_count1`, :func:`_bound64`) for a target (default: this CPU, as numba compiles
    for it), optimised as numba optimises, to check which popcount instructions they use."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()  # numba initialises only the host's
    llvm.initialize_all_asmprinters()
    i8, i64 = ir.IntType(8), ir.IntType(64)
    module = ir.Module(name="chem_popcount")
    emit: list[tuple[str, ir.Type, Callable[..., ir.Value]]] = [
        ("count8", i64, lambda b, q, t, n, cut: _emit_count8(b, q, t, n, cut)[1]),
        ("count1", i64, lambda b, q, t, n, cut: _emit_count1(b, q, t, n)),
        ("bound64", i8, lambda b, q, t, n, cut: _emit_bound64(b, q, t, n, cut)),
    ]
    for name, element, body in emit:
        fn_type = ir.FunctionType(i64, [element.as_pointer(), element.as_pointer(), i64, i64])
        fn = ir.Function(module, fn_type, name)
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        builder.ret(body(builder, *fn.args))
    triple = triple or llvm.get_process_triple()
    if not cpu:
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    parsed = llvm.parse_assembly(str(module))
    parsed.triple = triple
    machine = llvm.Target.from_triple(triple).create_target_machine(
        cpu=cpu, features=features, opt=3
    )
    passes = llvm.create_pass_builder(machine, llvm.PipelineTuningOptions(speed_level=3))
    passes.getModulePassManager().run(parsed, passes)
    return str(machine.emit_assembly(parsed))


# --- exact scores, bounds and cuts --------------------------------------------------------------


@njit(inline="always")
def _score(c: int, a: int, b: int, dice: bool) -> float:
    """RDKit's float64 division: Tanimoto ``c / (a + b - c)``, Dice ``2c / (a + b)``, 0 for 0/0."""
    if dice:
        num = 2.0 * c
        den = float(a + b)
    else:
        num = float(c)
        den = float(a + b - c)
    if den == 0.0:
        return 0.0
    return num / den


@njit(inline="always")
def _bound(a: int, b: int, dice: bool) -> float:
    """The best score a popcount-``a`` query can reach against popcount ``b`` (Swamidass-Baldi)."""
    return _score(min(a, b), a, b, dice)


@njit(inline="always")
def _window(a: int, best: float, lo: int, hi: int, dice: bool) -> tuple[int, int]:
    """Shrink [lo, hi] (around ``a``) to the popcounts whose bound reaches ``best``; empty
    (lo > hi) when even ``b = a`` cannot. The bound rises to ``b = a`` and falls after it."""
    while lo <= a and lo <= hi and _bound(a, lo, dice) < best:
        lo += 1
    while hi >= a and hi >= lo and _bound(a, hi, dice) < best:
        hi -= 1
    if lo > a or hi < a:
        return a + 1, a
    return lo, hi


@njit(inline="always")
def _cut(best: float, a: int, b_lo: int, dice: bool) -> int:
    """A little under the smallest count that can score ``>= best`` against any ``b >= b_lo``:
    Tanimoto ``c ≥ best/(1+best)·(a+b)``, Dice ``c ≥ best/2·(a+b)``."""
    if not best > 0.0:
        return 0
    key = best / 2.0 if dice else best / (1.0 + best)
    return int(np.ceil(key * (a + b_lo) * (1.0 - _CUT_SLACK)))


@njit(inline="always")
def _better(s: float, j: int, s_ref: float, j_ref: int) -> bool:
    """Ranks above: a higher score, or an equal one at a lower library index."""
    return s > s_ref or (s == s_ref and j < j_ref)


# --- layouts ------------------------------------------------------------------------------------


def words(bits: np.ndarray, multiple: int = 1) -> np.ndarray:
    """(N, n_bytes) uint8 → (N, W) uint64, zero-padded to a whole number of ``multiple`` words."""
    n, n_bytes = bits.shape
    n_words = max(1, -(-n_bytes // (8 * multiple))) * multiple
    out = np.zeros((n, n_words * 8), dtype=np.uint8)
    out[:, :n_bytes] = bits
    return out.view(np.uint64)


def _interleave(rows: np.ndarray, lanes: int) -> np.ndarray:
    """(N, W) → flat blocks of ``lanes`` rows, word-major inside a block (zero rows pad)."""
    n, n_words = rows.shape
    n_pad = -(-n // lanes) * lanes
    padded = np.zeros((n_pad, n_words), dtype=rows.dtype)
    padded[:n] = rows
    blocks = padded.reshape(n_pad // lanes, lanes, n_words).transpose(0, 2, 1)
    return np.ascontiguousarray(blocks).ravel()


def _segment_popcounts(w: np.ndarray, bits: int) -> np.ndarray:
    """(N, W) uint64 → (N, W · 64 / bits) uint8: the popcount of each ``bits``-bit segment."""
    return np.bitwise_count(w.view({64: np.uint64, 32: np.uint32}[bits])).astype(np.uint8)


class Library(NamedTuple):
    """A library sorted by popcount, for the searches (a named tuple: numba takes it whole).

    ``words`` flat (N, W) uint64 rows (W a multiple of 8); ``seg64`` and ``seg32`` the popcount
    of each 64-bit and 32-bit segment as uint8, in blocks of 64 rows interleaved segment-major
    (for :func:`_bound64`); ``rows`` (N,) original indices in sorted order, ``pop`` (N,) int64
    popcounts ascending, ``start`` (n_bits + 2,) the first sorted row of each popcount
    (``start[b]`` = rows below b).
    """

    words: np.ndarray
    seg64: np.ndarray
    seg32: np.ndarray
    rows: np.ndarray
    pop: np.ndarray
    start: np.ndarray
    n_words: int

    @classmethod
    def build(cls, bits: np.ndarray, popcounts: np.ndarray, n_bits: int) -> Library:
        pop = popcounts.astype(np.int64)
        order = np.argsort(pop, kind="stable")
        w = words(bits[order], LANES)
        seg64, seg32 = (_interleave(_segment_popcounts(w, b), BOUND_LANES) for b in (64, 32))
        start = np.searchsorted(pop[order], np.arange(n_bits + 2), side="left").astype(np.int64)
        return cls(w.ravel(), seg64, seg32, order.astype(np.int64), pop[order], start, w.shape[1])

    @property
    def chunk_rows(self) -> int:
        """Rows a query group works through together: their 64-bit segment popcounts fill
        CHUNK_BYTES."""
        return max(BOUND_LANES, CHUNK_BYTES // self.n_words // BOUND_LANES * BOUND_LANES)


class Queries(NamedTuple):
    """Queries sorted by popcount: ``words`` flat (N, W) rows, ``seg64``/``seg32`` flat
    segment popcounts (uint8), ``rows`` original indices, ``pop`` popcounts."""

    words: np.ndarray
    seg64: np.ndarray
    seg32: np.ndarray
    rows: np.ndarray
    pop: np.ndarray
    n_words: int

    @classmethod
    def build(cls, bits: np.ndarray, popcounts: np.ndarray) -> Queries:
        pop = popcounts.astype(np.int64)
        order = np.argsort(pop, kind="stable")
        w = words(bits[order], LANES)
        seg64, seg32 = (_segment_popcounts(w, b).ravel() for b in (64, 32))
        return cls(w.ravel(), seg64, seg32, order.astype(np.int64), pop[order], w.shape[1])


def _groups(n: int, threads: int) -> list[tuple[int, int]]:
    """Runs of at most GROUP sorted queries, small enough that every thread gets two."""
    size = max(1, min(GROUP, -(-n // (2 * threads))))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _threads() -> int:
    return max(1, int(numba.get_num_threads()))


def _run(work: Callable[[int, int], T], groups: list[tuple[int, int]]) -> list[T]:
    """``work(i0, i1)`` for every group, on :func:`_threads` threads (kernels release the GIL)."""
    threads = min(_threads(), len(groups))
    if threads <= 1:
        return [work(i0, i1) for i0, i1 in groups]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medbatch-popcount") as pool:
        return list(pool.map(lambda g: work(*g), groups))


# --- kernels ------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _similarity_rows(
    q, q_pop, i0, i1, n_words, blocks, l_pop, n_lib, dice, out
):  # pragma: no cover
    """``out[i]`` = scores of query rows i0..i1 against the whole library (original order)."""
    counts = np.empty(LANES, np.int64)
    block_words = n_words * LANES
    n_blocks = (n_lib + LANES - 1) // LANES
    for i in range(i0, i1):
        a = q_pop[i]
        for blk in range(n_blocks):
            _count8(q, i * n_words, blocks, blk * block_words, n_words, 0, counts)
            for lane in range(min(LANES, n_lib - blk * LANES)):
                j = blk * LANES + lane
                out[i, j] = _score(counts[lane], a, l_pop[j], dice)


@njit(inline="always")
def _lanes(row_lo: int, row_hi: int, first: int) -> int:
    """Bitmask of the lanes of the 64-row block at ``first`` that lie in [row_lo, row_hi)."""
    lo = max(0, row_lo - first)
    hi = min(BOUND_LANES, row_hi - first)
    upper = -1 if hi == BOUND_LANES else (1 << hi) - 1
    return upper & ~((1 << lo) - 1)


@njit(inline="always")
def _candidates(q64, q32, qi, l64, l32, n_words, blk, cut, row_lo, row_hi, fine):
    """(bitmask, fine) of the rows of 64-row block ``blk`` in [row_lo, row_hi) whose segment
    bound ``Σ_s min(popcount q_s, popcount l_s)`` reaches ``cut`` (every row where uint8
    cannot hold the cut). On MOSES molecules the bound on 32-bit segments let through a tenth
    of what the one on 64-bit words did (1% against 10% at top-10 cuts), at twice the cost: the
    coarse one runs until it lets many rows through (then ``fine`` stays set), as at a high
    threshold, where it lets through 0.02%."""
    mask = _lanes(row_lo, row_hi, blk * BOUND_LANES)
    if not 0 < cut <= 255:
        return mask, fine
    if fine:
        n = 2 * n_words
        return mask & _bound64(q32, qi * n, l32, blk * n * BOUND_LANES, n, cut), True
    mask &= _bound64(q64, qi * n_words, l64, blk * n_words * BOUND_LANES, n_words, cut)
    return mask, _ctpop(mask) > _FINE_AFTER


@njit(inline="always")
def _scan(queries, qi, lib, row_lo, row_hi, same, dice, top, t, scores, indices):
    """Count sorted query ``qi`` against the library rows in [row_lo, row_hi) that the segment
    bounds let through, a 64-row block at a time. With ``top`` (a constant at each call site, so
    the branches fold away), fold them into the query's running k best, ``scores``/``indices``
    (its rows of ``best``/``index``; the cut follows the k-th best) and return 0; else write
    those scoring ``>= t`` to ``scores``/``indices`` and return how many."""
    q, q64, q32 = queries.words, queries.seg64, queries.seg32
    l_words, l64, l32, l_rows, l_pop = lib.words, lib.seg64, lib.seg32, lib.rows, lib.pop
    n_words = lib.n_words
    a = queries.pop[qi]
    r = queries.rows[qi]
    k = scores.shape[0]
    found = 0
    fine = top  # at top-k cuts the 32-bit bound pays for itself (docs/compounds.md)
    for blk in range(row_lo // BOUND_LANES, (row_hi - 1) // BOUND_LANES + 1):
        cut = _cut(scores[k - 1] if top else t, a, l_pop[max(blk * BOUND_LANES, row_lo)], dice)
        mask, fine = _candidates(q64, q32, qi, l64, l32, n_words, blk, cut, row_lo, row_hi, fine)
        while mask != 0:
            row = blk * BOUND_LANES + _cttz(mask)
            mask &= mask - 1
            c = _count1(q, qi * n_words, l_words, row * n_words, n_words)
            if c < cut:
                continue
            j = l_rows[row]
            if same and j == r:
                continue
            s = _score(c, a, l_pop[row], dice)
            if not top:
                if s >= t:
                    scores[found] = s
                    indices[found] = j
                    found += 1
                continue
            if not _better(s, j, scores[k - 1], indices[k - 1]):
                continue
            pos = k - 1
            while pos > 0 and _better(s, j, scores[pos - 1], indices[pos - 1]):
                scores[pos] = scores[pos - 1]
                indices[pos] = indices[pos - 1]
                pos -= 1
            scores[pos] = s
            indices[pos] = j
    return found


@njit(inline="always")
def _rows_in(start, lo, hi, r_lo, r_hi):
    """The sorted library rows of chunk [r_lo, r_hi) whose popcounts lie in [lo, hi] (empty:
    row_lo >= row_hi)."""
    if lo > hi:
        return r_lo, r_lo
    return max(r_lo, start[lo]), min(r_hi, start[hi + 1])


@njit(nogil=True, cache=True)
def _top_k_group(queries, i0, i1, lib, chunk, same, dice, best, index):  # pragma: no cover
    """Fold the library into the running k best of sorted queries i0..i1."""
    q_rows, q_pop = queries.rows, queries.pop
    l_pop, start = lib.pop, lib.start
    n_lib = l_pop.shape[0]
    n_bits = start.shape[0] - 2
    k = best.shape[1]
    n = i1 - i0
    lo = np.zeros(n, np.int64)
    hi = np.full(n, n_bits, np.int64)
    for i in range(n):
        a = q_pop[i0 + i]
        lo[i], hi[i] = _window(a, best[q_rows[i0 + i], k - 1], lo[i], hi[i], dice)
    # Chunks outwards from the group's middle popcount: the k-th best scores rise early.
    middle = q_pop[(i0 + i1 - 1) // 2]
    n_chunks = (n_lib + chunk - 1) // chunk
    right = min(start[middle] // chunk, n_chunks - 1)
    left = right - 1
    while True:
        g_lo = lo.min()
        g_hi = hi.max()
        go_right = right < n_chunks and l_pop[right * chunk] <= g_hi
        left_top = l_pop[min(n_lib, (left + 1) * chunk) - 1] if left >= 0 else -1
        go_left = left >= 0 and left_top >= g_lo
        if not (go_right or go_left):
            break
        if go_right and (not go_left or l_pop[right * chunk] - middle <= middle - left_top):
            c = right
            right += 1
        else:
            c = left
            left -= 1
        r_lo = c * chunk
        r_hi = min(n_lib, r_lo + chunk)
        for i in range(n):
            row_lo, row_hi = _rows_in(start, lo[i], hi[i], r_lo, r_hi)
            if row_lo >= row_hi:
                continue
            qi = i0 + i
            r = q_rows[qi]
            _scan(queries, qi, lib, row_lo, row_hi, same, dice, True, 0.0, best[r], index[r])
            lo[i], hi[i] = _window(q_pop[qi], best[r, k - 1], lo[i], hi[i], dice)


@njit(nogil=True, cache=True)
def _threshold_group(queries, i0, i1, lib, chunk, same, dice, t):  # pragma: no cover
    """Every (query row, library index, score) with score >= t, for sorted queries i0..i1."""
    q_rows, q_pop = queries.rows, queries.pop
    start = lib.start
    n_bits = start.shape[0] - 2
    n = i1 - i0
    lo = np.zeros(n, np.int64)
    hi = np.full(n, n_bits, np.int64)
    for i in range(n):
        lo[i], hi[i] = _window(q_pop[i0 + i], t, 0, n_bits, dice)
    size = 0
    hit_q = np.empty(1024, np.int64)
    hit_l = np.empty(1024, np.int64)
    hit_s = np.empty(1024, np.float64)
    chunk_l = np.empty(chunk, np.int64)
    chunk_s = np.empty(chunk, np.float64)
    g_lo = lo.min()
    g_hi = hi.max()
    if g_lo > g_hi:
        return hit_q[:0], hit_l[:0], hit_s[:0]
    for r_lo in range(start[g_lo] // chunk * chunk, start[g_hi + 1], chunk):
        r_hi = r_lo + chunk
        for i in range(n):
            row_lo, row_hi = _rows_in(start, lo[i], hi[i], r_lo, r_hi)
            if row_lo >= row_hi:
                continue
            qi = i0 + i
            found = _scan(queries, qi, lib, row_lo, row_hi, same, dice, False, t, chunk_s, chunk_l)
            while size + found > hit_q.shape[0]:
                hit_q = np.concatenate((hit_q, np.empty(hit_q.shape[0], np.int64)))
                hit_l = np.concatenate((hit_l, np.empty(hit_l.shape[0], np.int64)))
                hit_s = np.concatenate((hit_s, np.empty(hit_s.shape[0], np.float64)))
            hit_q[size : size + found] = q_rows[qi]
            hit_l[size : size + found] = chunk_l[:found]
            hit_s[size : size + found] = chunk_s[:found]
            size += found
    return hit_q[:size], hit_l[:size], hit_s[:size]


# --- entry points -------------------------------------------------------------------------------


def similarity(
    q_bits: np.ndarray,
    q_pop: np.ndarray,
    l_bits: np.ndarray,
    l_pop: np.ndarray,
    *,
    dice: bool,
) -> np.ndarray:
    """(N_q, N_lib) float64 scores, as RDKit's ``Bulk*Similarity``."""
    q = words(q_bits)
    n_words = q.shape[1]
    blocks = _interleave(words(l_bits), LANES)
    a = q_pop.astype(np.int64)
    b = l_pop.astype(np.int64)
    out = np.empty((q.shape[0], b.shape[0]), dtype=np.float64)
    flat = q.ravel()

    def work(i0: int, i1: int) -> None:
        _similarity_rows(flat, a, i0, i1, n_words, blocks, b, b.shape[0], dice, out)

    if out.size:
        _run(work, _groups(q.shape[0], _threads()))
    return out


def top_k(
    queries: Queries, library: Library, k: int, *, same: bool, dice: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(N_q, k) scores (-inf where fewer than k) and library indices (int64 max there), best
    first, equal scores by lower library index; with ``same``, query row i never meets library
    row i."""
    n = queries.rows.shape[0]
    best = np.full((n, k), -np.inf)
    index = np.full((n, k), _NO_INDEX, dtype=np.int64)
    if n == 0 or library.rows.shape[0] == 0:
        return best, index

    def work(i0: int, i1: int) -> None:
        _top_k_group(queries, i0, i1, library, library.chunk_rows, same, dice, best, index)

    _run(work, _groups(n, _threads()))
    return best, index


def threshold(
    queries: Queries, library: Library, t: float, *, same: bool, dice: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query row, library index, score) with score >= t, unordered."""
    n = queries.rows.shape[0]
    if n == 0 or library.rows.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)

    def work(i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _threshold_group(queries, i0, i1, library, library.chunk_rows, same, dice, float(t))

    parts = _run(work, _groups(n, _threads()))
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )
