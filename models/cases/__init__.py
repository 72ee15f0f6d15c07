"""Case scoring: the model registry, featurizers, architectures, the inference contract
(:mod:`.inference`), explanations, shadow versions and bring-your-own models."""
