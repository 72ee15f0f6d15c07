"""How a pairs-only KING job is cut into 2-D tiles of the upper triangle (or a rectangle of query
samples by cohort samples): pure Python, so a submission plans its tiles without loading a kernel."""

from __future__ import annotations

from dataclasses import dataclass

#: Samples per block at most (a tile's kinships are then at most 2,048² float64 = 32 MB) ...
MAX_BLOCK = 2048
#: ... and at least (below, the per-tile work of reading the .bed outweighs the pair work).
MIN_BLOCK = 256
#: Bit planes of one block at most: 2 bits a call, so 2,048 samples at 32,768 variants.
BLOCK_PLANE_BYTES = 16 * 2**20
#: The degree names of :func:`models.genome.io.output.kinship_degree`, closest first, "unrelated"
#: for pairs kept below third degree (a cut-off under 2^(-9/2)) and "unknown" for a NaN kinship
#: (no heterozygous call where both samples are called: plink2's ``--king-table-filter`` keeps it).
DEGREES = ("duplicate/MZ twin", "1st", "2nd", "3rd", "unrelated", "unknown")


def default_block(n_variants: int) -> int:
    """Samples per block: :data:`MAX_BLOCK`, fewer where the planes would pass
    :data:`BLOCK_PLANE_BYTES` (a multiple of 64, at least :data:`MIN_BLOCK`)."""
    per_sample = 2 * 8 * max(1, -(-n_variants // 64))
    fit = BLOCK_PLANE_BYTES // per_sample
    return int(max(MIN_BLOCK, min(MAX_BLOCK, fit - fit % 64)))


# --- tiles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """Rows ``row_start:row_end`` against columns ``col_start:col_end`` (sample positions)."""

    row_start: int
    row_end: int
    col_start: int
    col_end: int

    @property
    def diagonal(self) -> bool:
        """A block against itself: only the pairs above its diagonal count."""
        return (self.row_start, self.row_end) == (self.col_start, self.col_end)

    @property
    def n_pairs(self) -> int:
        b = self.row_end - self.row_start
        if self.diagonal:
            return b * (b - 1) // 2
        return b * (self.col_end - self.col_start)


def _check_block(block: int) -> None:
    if block < 4 or block % 4:
        raise ValueError(f"block must be a positive multiple of 4 samples, got {block}")


def triangle_tiles(n: int, block: int) -> list[Tile]:
    """The upper triangle of an (n, n) square as tiles, row block by row block.

    Block ``b`` holds samples ``b·block … (b+1)·block`` (the last one fewer); tile (a, b) for
    a ≤ b. The blocks start at multiples of 4 samples, a whole byte of each .bed row.

    Returns
    -------
    list[Tile]
        ``K(K+1)/2`` tiles for ``K = ceil(n / block)`` blocks, (0, 0), (0, 1), … (K-1, K-1).
    """
    _check_block(block)
    starts = list(range(0, n, block))
    return [
        Tile(a, min(a + block, n), b, min(b + block, n))
        for k, a in enumerate(starts)
        for b in starts[k:]
    ]


def rectangle_tiles(n_rows: int, n_cols: int, block: int) -> list[Tile]:
    """Every (row block x column block) of an (n_rows, n_cols) rectangle (query mode)."""
    _check_block(block)
    return [
        Tile(a, min(a + block, n_rows), b, min(b + block, n_cols))
        for a in range(0, n_rows, block)
        for b in range(0, n_cols, block)
    ]
