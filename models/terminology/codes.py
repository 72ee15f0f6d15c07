"""Code systems as hospitals spell them: one table from every known identifier to the canonical
FHIR system URI, and how each system's codes compare.

A feed may name LOINC as ``http://loinc.org`` (the FHIR URI), ``urn:oid:2.16.840.1.113883.6.1``
(its HL7 OID, common in feeds converted from CDA or HL7 v2), ``LN`` (the HL7 v2 table 0396
mnemonic) or a legacy spelling (``http://www.loinc.org``, a trailing slash, ``https://`` for
``http://``). They all mean one code
system, so a schema lists codes under the canonical URI and every spelling below matches them.

Sources, one per column of :data:`CODE_SYSTEMS`:

- URI and OID: HL7 Terminology (THO), "External Code Systems"
  (https://terminology.hl7.org/external_terminologies.html), and FHIR R4 "Using Codes in
  Resources", 4.2.2 (https://hl7.org/fhir/R4/terminologies-systems.html).
- HL7 v2 mnemonics: THO CodeSystem v2-0396 "Coding System"
  (https://terminology.hl7.org/CodeSystem-v2-0396.html): LN, SCT, I10C, I10, I9CDX, UCUM.
- SNOMED CT edition URIs (``http://snomed.info/sct/<module id>``) belong in ``Coding.version``
  per "Using SNOMED CT with HL7 Standards" (https://terminology.hl7.org/SNOMEDCT.html); feeds put
  them in ``system`` nonetheless, so they are read as SNOMED CT.
- ICD codes without their dot (``I509`` for ``I50.9``) are how claims systems store them
  (CMS ICD-10-CM files list codes without dots); the dot is not part of the code's meaning.

Pure data and string handling: no imports beyond the standard library, so the registry can check
a schema's codes without loading FHIR models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"
UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class CodeSystem:
    """One code system: its canonical FHIR URI, short name and every other spelling of it."""

    uri: str
    name: str
    oid: str
    v2: tuple[str, ...]
    #: Other spellings seen in feeds (compared case-insensitively, trailing slash ignored,
    #: https:// read as http://).
    legacy: tuple[str, ...] = ()
    #: Codes compare without dots and case (ICD); otherwise exactly.
    dotless: bool = False


#: The table. Each row's identifiers all normalise to ``uri``.
CODE_SYSTEMS: tuple[CodeSystem, ...] = (
    CodeSystem(LOINC, "LOINC", "2.16.840.1.113883.6.1", ("LN",),
               ("http://www.loinc.org", "LOINC")),
    CodeSystem(SNOMED, "SNOMED CT", "2.16.840.1.113883.6.96", ("SCT", "SNM"),
               ("http://snomed.info", "SNOMED", "SNOMEDCT", "SNOMED-CT", "SNOMED CT")),
    CodeSystem(ICD10CM, "ICD-10-CM", "2.16.840.1.113883.6.90", ("I10C",),
               ("ICD10CM", "ICD-10-CM", "http://hl7.org/fhir/sid/icd-10-us"), dotless=True),
    CodeSystem(ICD10, "ICD-10", "2.16.840.1.113883.6.3", ("I10",),
               ("ICD10", "ICD-10", "http://www.who.int/classifications/icd10"), dotless=True),
    CodeSystem(ICD9CM, "ICD-9-CM", "2.16.840.1.113883.6.103", ("I9CDX", "I9C"),
               ("ICD9CM", "ICD-9-CM"), dotless=True),
    CodeSystem(UCUM, "UCUM", "2.16.840.1.113883.6.8", ("UCUM",), ("UCUM",)),
)  # fmt: skip

_SNOMED_EDITION = re.compile(r"^https?://snomed\.info/sct/\d+(/version/\d+)?$", re.IGNORECASE)


def system_key(identifier: str) -> str:
    """A code system identifier as compared: case, a trailing slash and https:// vs http://
    do not tell systems apart."""
    # The scheme is not part of a system's identity: feeds send https:// for the http:// URIs
    # FHIR defines (https://hl7.org/fhir/sid/icd-10-cm, https://www.loinc.org).
    key = identifier.strip().rstrip("/").lower()
    return "http://" + key[len("https://") :] if key.startswith("https://") else key


def _spellings() -> dict[str, CodeSystem]:
    table: dict[str, CodeSystem] = {}
    for system in CODE_SYSTEMS:
        for spelling in (
            system.uri,
            system.oid,
            f"urn:oid:{system.oid}",
            *system.v2,
            *system.legacy,
        ):
            table[system_key(spelling)] = system
    return table


_BY_SPELLING = _spellings()
_BY_URI = {s.uri: s for s in CODE_SYSTEMS}


def canonical_system(identifier: str | None) -> str | None:
    """The canonical URI for any known spelling of a code system, else None.

    >>> canonical_system("urn:oid:2.16.840.1.113883.6.1")
    'http://loinc.org'
    """
    if not identifier:
        return None
    found = _BY_SPELLING.get(system_key(identifier))
    if found is not None:
        return found.uri
    if _SNOMED_EDITION.match(identifier.strip()):
        return SNOMED
    return None


def system_name(uri: str) -> str:
    """``LOINC`` for ``http://loinc.org``; an unknown URI is returned as it is."""
    found = _BY_URI.get(uri)
    return found.name if found is not None else uri


def normal_code(system_uri: str, code: str) -> str:
    """A code as compared within its (canonical) system: ICD codes without dot, upper case."""
    found = _BY_URI.get(system_uri)
    code = code.strip()
    if found is not None and found.dotless:
        return code.replace(".", "").upper()
    return code


def coding_key(system: str | None, code: str | None) -> tuple[str, str] | None:
    """``(canonical system, normal code)`` for a Coding, or None when its system is unknown."""
    uri = canonical_system(system)
    if uri is None or not code:
        return None
    return uri, normal_code(uri, code)
