"""Names of server files that a request may give (genotype filesets, molecule libraries), confined
to their folder.

The check is made on each file that will actually be read, resolved through every symlink: for a
PLINK prefix its .bed, .bim and .fam, for a VCF/BCF or a molecule file the file itself. The folder
itself, its parent, ``..``, absolute paths, NUL and symlinks that leave the folder are refused;
so is ``"."``, whose files (``<folder>.bed``) would lie beside the folder. Refusals name the field,
never a server path.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from fastapi.exceptions import RequestValidationError

from models.genome.io.vcf import is_vcf

if TYPE_CHECKING:
    from medbatch.settings import Settings

Kind = Literal["genotypes", "molecules"]
_PLINK = (".bed", ".bim", ".fam")
#: A PLINK 2 fileset's suffixes, taken off a prefix as the reader does (models.genome.io.plink),
#: so that its refusal says how to convert it.
_PLINK2 = (".pgen", ".pvar", ".psam")
_FOLDER = {"genotypes": "genotype folder", "molecules": "compound folder"}
#: The setting behind each folder, named (never its value) when a file is not found in it.
_SETTING = {"genotypes": "MEDBATCH_GENOTYPE_DIR", "molecules": "MEDBATCH_COMPOUND_DIR"}
#: A file a field named and the server did not find: ``<bfile>.bed not found``.
_NOT_FOUND = re.compile(r"<\w+>(\.\w+)? not found")


def _refuse(field: str, kind: Kind, why: str) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("body", field),
                "msg": f"must name a file inside the server's {_FOLDER[kind]}: {why}",
            }
        ]
    )


def files_read(name: str, kind: Kind) -> tuple[str, list[str]]:
    """``(what to pass on, the files that will be opened)``, both relative to the folder."""
    if kind == "molecules" or is_vcf(name):
        return name, [name]
    prefix = name.rsplit(".", 1)[0] if name.endswith(_PLINK + _PLINK2) else name
    return prefix, [prefix + ext for ext in _PLINK]


def confine(root: Path, name: str, field: str, *, kind: Kind) -> Path:
    """``root/name``, checked as the module says; :class:`RequestValidationError` if refused."""
    if "\x00" in name:
        raise _refuse(field, kind, "NUL in the name")
    parts = PurePosixPath(name).parts
    if not parts or name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise _refuse(field, kind, "give a path relative to it")
    if any(p in ("..", ".") for p in parts) or "\\" in name:
        raise _refuse(field, kind, "'.', '..' and backslashes are not allowed")
    base = root.resolve()
    passed, opened = files_read(name, kind)
    for relative in opened:
        try:
            real = (base / relative).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
            raise _refuse(field, kind, "the name cannot be resolved") from None
        if real == base or not real.is_relative_to(base):
            raise _refuse(field, kind, "it, or a link in it, leads outside the folder")
    return base / passed


def public_message(
    text: str,
    root: Path,
    given: dict[str, str | None],
    *,
    kind: Kind,
    values: dict[str, str] | None = None,
) -> str:
    """A worker's refusal, its server paths written as the field they came from (``<bfile>``) or
    as the folder, and other ``values`` the caller sent as their field: neither the server's
    layout nor the caller's input is echoed."""
    base = str(root.resolve())
    for field, name in given.items():
        if name:
            text = text.replace(f"{base}/{files_read(name, kind)[0]}", f"<{field}>")
    for field, value in (values or {}).items():
        text = text.replace(repr(value), f"<{field}>")
    text = text.replace(base, f"<{_FOLDER[kind]}>")
    if _NOT_FOUND.search(text):
        # A path relative to the caller's own folder (examples/genotypes/cohort), or a server
        # started without the folder set, was only "<bfile>.bed not found".
        text += f"; names are relative to the server's {_FOLDER[kind]} ({_SETTING[kind]})"
    return text


def without_server_paths(text: str, settings: Settings) -> str:
    """A job's error as clients see it: the server's genotype, compound and artifact folders
    written as ``<genotype folder>`` and so on (a tile's error names the files it read)."""
    folders = {
        _FOLDER["genotypes"]: settings.genotype_dir,
        _FOLDER["molecules"]: settings.compound_dir,
        "artifact store": settings.artifact_dir,
    }
    spelled = {(str(p), name) for name, root in folders.items() for p in (root, root.resolve())}
    # The longest first: a folder inside another is replaced before the one that holds it.
    for path, name in sorted(spelled, key=lambda s: -len(s[0])):
        if path not in ("", ".", "/"):
            text = text.replace(path, f"<{name}>")
    return text
