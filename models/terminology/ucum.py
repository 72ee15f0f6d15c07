"""Units by their UCUM meaning: parse a unit, compare dimensions, convert.

UCUM codes are parsed by ``ucumvert`` (a Python parser of the UCUM grammar of the specification,
https://ucum.org/ucum, with a lark grammar and the UCUM essence file) into ``pint`` quantities,
so ``{beats}/min``, ``{Beats}/min``, ``1/min`` and ``/min`` are one unit (curly-brace annotations
carry no meaning in UCUM, §12 of the specification) and ``kPa`` converts to ``mm[Hg]``.

What hospitals send is not always a UCUM code: ``Quantity.unit`` is a display string, and some
feeds put that string in ``Quantity.code`` too. :data:`DISPLAY_SPELLINGS` maps the display forms
met in feeds to UCUM codes, each from a published example: HL7 FHIR R4 vital-signs examples
(``beats/minute``, ``mmHg``), HL7 v2 / LOINC example units (``beats per minute``, ``BPM``), and
the mis-encodings of ``°`` and ``µ``. It is a table of spellings, not of conversions: every
conversion goes through UCUM's definitions.

pint's own value for the millimetre of mercury (the conventional 133.322387415 Pa, NIST SP 811)
is 2.9e-6 away from UCUM's (``m[Hg]`` = 133.3220 kPa): the registry here takes UCUM's, read from
the UCUM essence file ucumvert ships. Mass ↔ amount-of-substance needs the analyte's molar mass,
which UCUM does not hold (:data:`MOLAR_MASS_G_PER_MOL`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

#: Display spellings → UCUM code. Looked up exactly, then case-insensitively.
DISPLAY_SPELLINGS: dict[str, str] = {
    # heart and respiratory rates
    "beats/minute": "/min",
    "beats/min": "/min",
    "beats per minute": "/min",
    "beat/min": "/min",
    "bpm": "/min",
    "/minute": "/min",
    "per minute": "/min",
    "breaths/minute": "/min",
    "breaths/min": "/min",
    # pressure
    "mmhg": "mm[Hg]",
    "mm hg": "mm[Hg]",
    "mm of hg": "mm[Hg]",
    "cmh2o": "cm[H2O]",
    # body mass index, mass, length
    "kg/m^2": "kg/m2",
    "kg/m²": "kg/m2",
    "kg/sq m": "kg/m2",
    "lbs": "[lb_av]",
    "lb": "[lb_av]",
    "in": "[in_i]",
    "inches": "[in_i]",
    # temperature
    "°c": "Cel",
    "degc": "Cel",
    "deg c": "Cel",
    "celsius": "Cel",
    "°f": "[degF]",
    "degf": "[degF]",
    "deg f": "[degF]",
    "fahrenheit": "[degF]",
    # time
    "years": "a",
    "year": "a",
    "yr": "a",
    "yrs": "a",
    # micro as the micro sign or Greek mu
    "µmol/l": "umol/L",
    "μmol/l": "umol/L",
    "µg/l": "ug/L",
    "mcg": "ug",
}

#: Molar masses for mass ↔ substance conversions, g/mol, by LOINC code of the measurement.
#: Glucose C6H12O6 180.16; creatinine C4H7N3O 113.12 (PubChem CIDs 5793 and 588).
MOLAR_MASS_G_PER_MOL: dict[str, float] = {
    "2339-0": 180.16,  # Glucose [Mass/volume] in Blood
    "2345-7": 180.16,  # Glucose [Mass/volume] in Serum or Plasma
    "15074-8": 180.16,  # Glucose [Moles/volume] in Blood
    "14749-6": 180.16,  # Glucose [Moles/volume] in Serum or Plasma
    "2160-0": 113.12,  # Creatinine [Mass/volume] in Serum or Plasma
    "38483-4": 113.12,  # Creatinine [Mass/volume] in Blood
    "14682-9": 113.12,  # Creatinine [Moles/volume] in Serum or Plasma
    "59826-8": 113.12,  # Creatinine [Moles/volume] in Blood
}


class UnitError(ValueError):
    """A unit that is not UCUM (nor a known spelling), or that cannot express another."""


@cache
def _registry() -> Any:
    """A pint registry of its own with ucumvert's UCUM definitions (not pint's application-wide
    registry, which ``PintUcumRegistry`` would also change). Built once: about a second."""
    from pathlib import Path

    import pint
    import ucumvert
    from ucumvert import UcumToPintTransformer, get_ucum_parser

    registry: Any = pint.UnitRegistry(on_redefinition="ignore")
    registry.load_definitions(Path(ucumvert.__file__).with_name("pint_ucum_defs.txt"))
    # pint's meter_Hg is the conventional 133.322387415 kPa; UCUM defines m[Hg] as 133.3220 kPa.
    # UCUM's value, read from the essence file ucumvert ships, is the one used.
    registry.define(f"meter_Hg = {_essence_value('m[Hg]', 'kPa')} * kilopascal = mHg = m_Hg")
    registry.ucum_parser = get_ucum_parser()
    registry.ucum_transform = UcumToPintTransformer(ureg=registry).transform
    return registry


def _essence_value(code: str, unit: str) -> float:
    """A unit's defining value from ucum-essence.xml (the UCUM table of units)."""
    import xml.etree.ElementTree as ElementTree
    from pathlib import Path

    import ucumvert

    essence = Path(ucumvert.__file__).parent / "vendor" / "ucum-essence.xml"
    root = ElementTree.parse(essence).getroot()
    for element in root.findall("{*}unit"):
        if element.get("Code") == code:
            value = element.find("{*}value")
            if value is not None and value.get("Unit") == unit:
                return float(value.get("value", "nan"))
    raise LookupError(f"{code} in {unit} is not in {essence}")


@dataclass(frozen=True)
class Unit:
    """A parsed unit: the UCUM code it was read as, and its pint quantity (magnitude times units)."""

    code: str
    quantity: Any

    @property
    def dimension(self) -> str:
        dims = str(self.quantity.dimensionality)
        return "dimensionless" if dims == "dimensionless" else dims


def _parse_ucum(code: str) -> Unit | None:
    from ucumvert import InvalidUcumError

    try:
        registry = _registry()
        quantity = registry.ucum_transform(registry.ucum_parser.parse(code))
        if not isinstance(quantity, registry.Quantity):
            # ucumvert gives back the bare token for an annotation alone ("{beats}", "{count}")
            # and a plain int for a product of annotations ("{a}.{b}"). UCUM §12: an
            # annotation alone stands for the unity 1, so these are dimensionless.
            if not isinstance(quantity, str | int) or isinstance(quantity, bool):
                return None
            quantity = registry.Quantity(1, "dimensionless")
        return Unit(code, quantity)
    except (InvalidUcumError, ValueError, KeyError, AttributeError, TypeError):
        return None
    except Exception as exc:  # pint's own errors (undefined unit) derive from these or not
        if type(exc).__module__.startswith(("pint", "lark", "ucumvert")):
            return None
        raise


@lru_cache(maxsize=1024)
def parse_unit(spelling: str) -> Unit:
    """A UCUM code or a display spelling of one, parsed; :class:`UnitError` if it is neither."""
    text = spelling.strip()
    if not text:
        raise UnitError("no unit given")
    code = DISPLAY_SPELLINGS.get(text) or DISPLAY_SPELLINGS.get(text.lower())
    # A known display spelling first: "mmHg" is not UCUM, and "C" would parse as the coulomb.
    parsed = _parse_ucum(code) if code is not None else _parse_ucum(text)
    if parsed is None:
        raise UnitError(f"unit {_shown(text)} is neither a UCUM code nor a known spelling of one")
    return parsed


def convert(value: float, unit: str, to: str, *, loinc: str | None = None) -> float:
    """``value`` in ``unit`` expressed in ``to``, by UCUM's meaning of both.

    ``loinc`` (the measurement's code) supplies a molar mass for mass ↔ substance concentrations.
    Raises :class:`UnitError` naming both units and their dimensions when they do not agree.
    """
    source, target = parse_unit(unit), parse_unit(to)
    try:
        return _convert(value, unit, to, source, target, loinc)
    except (OverflowError, ZeroDivisionError) as exc:  # a factor such as 10*999999
        raise UnitError(f"unit {_shown(unit)} has a factor out of range") from exc
    except Exception as exc:
        # pint's own refusals: an offset unit (Cel, [degF]) or a logarithmic one (B, Np)
        # multiplied by a molar mass is OffsetUnitCalculusError, a 500 on POST /v1/fhir.
        if type(exc).__module__.startswith("pint"):
            raise UnitError(
                f"unit {_shown(unit)} ({source.dimension}) cannot be converted to {to!r} "
                f"({target.dimension})"
            ) from exc
        raise


def _convert(
    value: float, unit: str, to: str, source: Unit, target: Unit, loinc: str | None
) -> float:
    if source.code == target.code and source.quantity.magnitude == target.quantity.magnitude:
        return float(value)
    registry = _registry()
    q_from, q_to = source.quantity, target.quantity
    if q_from.dimensionality != q_to.dimensionality:
        molar = MOLAR_MASS_G_PER_MOL.get(loinc or "")
        per_mass = registry.Quantity(1.0 / molar, "mol/g") if molar else None
        if per_mass is not None:
            moved = (q_from * per_mass) if _has_mass(q_from) else (q_from / per_mass)
            if moved.dimensionality == q_to.dimensionality:
                return float((value * moved).to(q_to.units).magnitude / q_to.magnitude)
        raise UnitError(
            f"unit {_shown(unit)} ({source.dimension}) cannot be converted to {to!r} "
            f"({target.dimension})"
        )
    if q_from.magnitude == 1 and q_to.magnitude == 1:
        # Offset units (Cel, [degF]) convert only as quantities built from the value.
        return float(registry.Quantity(value, q_from.units).to(q_to.units).magnitude)
    return float((value * q_from).to(q_to.units).magnitude / q_to.magnitude)


def _shown(unit: str, limit: int = 40) -> str:
    """A sent unit as quoted in a message: at most ``limit`` characters (it is the sender's text,
    kept in case records and RiskAssessment notes)."""
    text = unit.strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _has_mass(quantity: Any) -> bool:
    return "[mass]" in dict(quantity.dimensionality)
