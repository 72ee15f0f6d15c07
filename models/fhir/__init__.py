"""FHIR R4 bundles and NDJSON exports mapped to a model's features (:mod:`.features`)."""
