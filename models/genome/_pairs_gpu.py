"""The KING tile kernel as exact integer GEMMs (torch): CUDA workers' engine for pairs-only jobs.

For two blocks of samples with A1 dosages ``x`` (missing calls as 0), called-call indicators
``c`` and heterozygote indicators ``h``, every count KING-robust needs over the variants called
in both samples of a pair is one product of small integer matrices:

- ``Σ_{both called} (x_i - x_j)² = [x², c, x]_i · [c, x², -2x]_j``: one GEMM with 3 columns a
  variant (every term is within ±8, so int32 sums are exact for any cohort of under 2²⁸ variants);
- ``HET_i|j = h_i · c_j`` (i's heterozygous calls where j is called) and ``HET_j|i = c_i · h_j``.

Then ``kinship = 0.5 - Σ(x_i - x_j)² / (4·min(HET_i|j, HET_j|i))`` in float64, the same division
as plink2 and :mod:`models.genome._cpu`, so the kinships are equal bit for bit (IEEE-754 division
is correctly rounded on CUDA as on the CPU; 0/0 and x/0 give NaN and -inf as there).

On CUDA the products are int8 tensor-core GEMMs (``torch._int_mm``, int32 out), with rows and
variants padded to multiples of 8 as cuBLASLt asks; where ``_int_mm`` refuses a shape, float32
products (TF32 tensor cores: every operand is a small integer, every chunk's sum below 2²⁴, so
still exact). On the CPU the same code runs with ``_int_mm`` where the CPU has AMX/VNNI, so it is
tested on every machine; the CPU's own tile engine is the bit-plane kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from models.cpu_features import fast_int8_gemm

#: Variants per chunk on CUDA (3·65,536 int8 columns: 400 MB for a block of 2,048) and on the CPU.
CUDA_CHUNK = 65_536
CPU_CHUNK = 8_192
#: |term| of a variant in any of the three products (the distance's: at most 8).
_TERM_BOUND = 8


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an int8 matrix to at least ``rows`` rows and a multiple of 8 of each."""
    r = max(rows, -(-x.shape[0] // 8) * 8)
    c = -(-x.shape[1] // 8) * 8
    if (r, c) == tuple(x.shape):
        return x.contiguous()
    out = x.new_zeros((r, c))
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _products(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right.T`` exactly, as int32, for int8 (n, k) and (m, k)."""
    n, m = left.shape[0], right.shape[0]
    use_int_mm = left.device.type == "cuda" or fast_int8_gemm()
    if use_int_mm and left.shape[1] >= 8:
        try:
            # cuBLASLt's int8 GEMM wants m > 16 and k, n multiples of 8; zeros add nothing.
            a, b = _pad(left, 32, 0), _pad(right, 8, 0)
            return torch._int_mm(a, b.T)[:n, :m]
        except RuntimeError:
            pass
    # Exact: small integers, and each chunk's sums stay below 2^24 (see CUDA_CHUNK).
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return (left.float() @ right.float().T).round().to(torch.int32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _sides(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x², c, x, h) as int8 from int8 codes (negative = missing)."""
    called = codes >= 0
    x = torch.where(called, codes, torch.zeros_like(codes))
    return x * x, called.to(torch.int8), x, (codes == 1).to(torch.int8)


def king_tile_gemm(
    rows: np.ndarray,
    cols: np.ndarray | None = None,
    *,
    device: str | torch.device = "cuda",
    variant_chunk: int | None = None,
) -> np.ndarray:
    """KING-robust kinship of every row sample against every column sample, by integer GEMMs.

    Parameters
    ----------
    rows, cols
        (B_r, M) and (B_c, M) int8 dosages of A1, negative for a missing call; ``cols=None``
        for a block against itself.
    device
        ``"cuda"`` (the GPU worker's engine) or ``"cpu"``.
    variant_chunk
        Variants per product (default :data:`CUDA_CHUNK` on CUDA, :data:`CPU_CHUNK` on the CPU).

    Returns
    -------
    np.ndarray
        (B_r, B_c) float64, equal to :func:`models.genome.pairs.king_tile` (0.5 on a block's own
        diagonal).
    """
    with torch.inference_mode():
        return _kinship(rows, cols, torch.device(device), variant_chunk).cpu().numpy()


def king_tile_pairs_gemm(
    rows: np.ndarray,
    cols: np.ndarray | None = None,
    *,
    cutoff: float,
    device: str | torch.device = "cuda",
    variant_chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of a tile with kinship ≥ ``cutoff`` or NaN (as plink2's ``--king-table-filter``:
    :func:`models.genome.pairs.kept`), selected on the device, so that only they
    cross back to the host (a tile of 8,192² would be 512 MB of float64).

    Returns
    -------
    tuple of np.ndarray
        (P,) row and column positions within the blocks (row < column for a block against
        itself) and (P,) float64 kinships, in row-major order.
    """
    with torch.inference_mode():
        kinship = _kinship(rows, cols, torch.device(device), variant_chunk)
        keep = (kinship >= cutoff) | torch.isnan(kinship)  # as plink2: NaN is not < cutoff
        if cols is None:
            keep = torch.triu(keep, diagonal=1)
        r, c = torch.nonzero(keep, as_tuple=True)
        return r.cpu().numpy(), c.cpu().numpy(), kinship[r, c].cpu().numpy()


def _kinship(
    rows: np.ndarray, cols: np.ndarray | None, device: torch.device, variant_chunk: int | None
) -> torch.Tensor:
    """(B_r, B_c) float64 kinships on ``device`` (see :func:`king_tile_gemm`)."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or (cols is not None and (cols.ndim != 2 or cols.shape[1] != rows.shape[1])):
        raise ValueError(
            f"rows and cols: expected (B, M) blocks over the same variants, got {rows.shape} and "
            f"{None if cols is None else cols.shape}"
        )
    chunk = variant_chunk or (CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK)
    if chunk * _TERM_BOUND * 3 > 2**24:
        raise ValueError(f"variant_chunk {chunk}: chunk sums could pass 2^24 in float32")
    same = cols is None
    n_r, m = rows.shape
    n_c = n_r if cols is None else cols.shape[0]
    distance = torch.zeros((n_r, n_c), dtype=torch.int64, device=device)
    het_rc = torch.zeros_like(distance)
    het_cr = torch.zeros_like(distance)
    for v0 in range(0, m, chunk):
        r = torch.from_numpy(np.ascontiguousarray(rows[:, v0 : v0 + chunk], np.int8)).to(device)
        x2_r, c_r, x_r, h_r = _sides(r)
        if same:
            x2_c, c_c, x_c, h_c = x2_r, c_r, x_r, h_r
        else:
            assert cols is not None
            c = torch.from_numpy(np.ascontiguousarray(cols[:, v0 : v0 + chunk], np.int8))
            x2_c, c_c, x_c, h_c = _sides(c.to(device))
        left = torch.cat([x2_r, c_r, x_r], dim=1)
        right = torch.cat([c_c, x2_c, -2 * x_c], dim=1)
        distance += _products(left, right)
        het_rc += _products(h_r, c_c)
        if not same:
            het_cr += _products(c_r, h_c)
    if same:
        het_cr = het_rc.T
    den = 4.0 * torch.minimum(het_rc, het_cr).to(torch.float64)
    kinship = 0.5 - distance.to(torch.float64) / den
    if same:
        kinship.fill_diagonal_(0.5)
    return kinship
