"""Compound similarity: RDKit fingerprints and Tanimoto/Dice searches (:mod:`.chem`), with
private popcount kernels."""
