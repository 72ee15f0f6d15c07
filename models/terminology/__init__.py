"""Clinical codes (LOINC, SNOMED CT systems) and UCUM units: shared by the registry's checks and
the FHIR mapping."""
