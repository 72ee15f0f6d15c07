"""The reference models' training recipes, their data sets and evaluation reports; imported only
by ``medbatch models train|evaluate`` (and the demo and the OpenAPI example, for held-out data)."""
