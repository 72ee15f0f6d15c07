"""hm3_relatives: 76 HapMap3 founders (38 CEU, 38 YRI) and 20 relatives built from them.

Run in tests/data/genome (see README.md); then copy the shared .bim over the one written here.
"""

import os

import numpy as np
from bed_reader import open_bed, to_bed

SHARED = os.environ.get("MEDBATCH_SHARED_DIR", "../../../../shared") + "/data/genotypes"
S = SHARED + "/HM3_thinned_autosomal_overlap"
with open(SHARED + "/relationships_w_pops_121708.txt") as table:
    pops = {f[1]: f[6] for f in (line.split() for line in table.read().splitlines()[1:])}
with open(S + ".fam") as handle:
    fam = [line.split() for line in handle]
ceu = [i for i, f in enumerate(fam) if pops.get(f[1]) == "CEU"][:38]
yri = [i for i, f in enumerate(fam) if pops.get(f[1]) == "YRI"][:38]
founders = ceu + yri
with open_bed(S + ".bed", count_A1=True) as bed:
    x = bed.read(index=np.s_[founders, :], dtype="float64")  # NaN missing
    sid, a1, a2 = bed.sid, bed.allele_1, bed.allele_2
rng = np.random.default_rng(18)


def gamete(parent):
    """One allele per site, drawn independently (unphased genotypes: a per-site meiosis)."""
    return np.where(np.isnan(parent), np.nan, (rng.random(parent.shape) < parent / 2).astype(float))


rows = list(x)
fids = [fam[i][0] for i in founders]
iids = [fam[i][1] for i in founders]
relatives = []  # (iid_a, iid_b, degree)


def add(genotypes, fid, iid):
    rows.append(genotypes)
    fids.append(fid)
    iids.append(iid)
    return len(rows) - 1


for k in range(4):  # duplicates: 0.1% of calls changed, 0.5% more set missing
    src = 4 * k
    dup = x[src].copy()
    flip = rng.random(dup.shape) < 0.001
    dup[flip] = np.where(dup[flip] == 2, 1, 2)
    dup[rng.random(dup.shape) < 0.005] = np.nan
    add(dup, fids[src], iids[src] + "_dup")
    relatives.append((iids[src], iids[src] + "_dup", "duplicate/MZ twin"))
for k in range(4):  # a family from each population pair of founders
    base = 1 + 18 * k if k < 2 else 38 + 1 + 18 * (k - 2)
    a, b, d, e = base, base + 2, base + 4, base + 6
    fid = f"FAM{k}"
    c1 = add(gamete(x[a]) + gamete(x[b]), fid, f"FAM{k}_C1")
    c2 = add(gamete(x[a]) + gamete(x[b]), fid, f"FAM{k}_C2")
    c3 = add(gamete(x[a]) + gamete(x[d]), fid, f"FAM{k}_C3")
    g = add(gamete(rows[c1]) + gamete(x[e]), fid, f"FAM{k}_G")

    def I(r):  # noqa: E743
        return iids[r]

    relatives += [
        (I(a), I(c1), "1st"),
        (I(b), I(c1), "1st"),
        (I(a), I(c2), "1st"),
        (I(b), I(c2), "1st"),
        (I(a), I(c3), "1st"),
        (I(d), I(c3), "1st"),
        (I(c1), I(c2), "1st"),
        (I(c1), I(c3), "2nd"),
        (I(c2), I(c3), "2nd"),
        (I(c1), I(g), "1st"),
        (I(e), I(g), "1st"),
        (I(a), I(g), "2nd"),
        (I(b), I(g), "2nd"),
        (I(c2), I(g), "2nd"),
        (I(c3), I(g), "3rd"),
    ]
values = np.vstack(rows)
to_bed(
    "hm3_relatives.bed",
    values,
    properties={
        "fid": fids,
        "iid": iids,
        "sid": sid,
        "allele_1": a1,
        "allele_2": a2,
        "chromosome": open_bed(S + ".bed").chromosome,
        "bp_position": open_bed(S + ".bed").bp_position,
    },
)
with open("hm3_relatives.relatives.tsv", "w") as out:
    out.write("IID1\tIID2\tDEGREE\n")
    out.writelines(f"{p}\t{q}\t{d}\n" for p, q, d in relatives)
print(values.shape, len(relatives))
