"""The docs cannot rot quietly: the README stays short, every link and every `examples/` file the
docs name exists, every MEDBATCH_* variable they name is a setting and every setting is
documented, and the numbers they quote from the registry are the registry's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from medbatch.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Variables read by the test suite, and those docker-compose.yml reads (host folders to mount),
#: not by medbatch.
TEST_ONLY = set(
    re.findall(r"\"(MEDBATCH_TEST_\w+)\"", (ROOT / "tests" / "conftest.py").read_text())
)
COMPOSE_ONLY = set(
    re.findall(r"\$\{(MEDBATCH_\w+?)[:}]", (ROOT / "docker-compose.yml").read_text())
)


def _text(path: Path) -> str:
    return path.read_text()


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = _text(ROOT / "README.md").splitlines()
    assert len(lines) <= 200
    first_code = lines.index("```bash")
    assert lines[first_code + 1].startswith("make demo") and lines[first_code + 2].startswith(
        "make test"
    )
    assert first_code < 40


def _anchors(doc: Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation out, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", _text(doc), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _text(doc)):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{doc.relative_to(ROOT)}: no heading {target}"


def test_every_doc_named_in_plain_text_exists() -> None:
    """A doc or a module that names a doc as text (``see docs/NAME.md``, not a link) names one
    that exists: docs/scoring-path.md sent readers to a docs/scoring-bench.md there never was."""
    sources = [*DOCS, ROOT / "Makefile", ROOT / "docker-compose.yml"]
    for package in ("medbatch", "api_shim", "worker", "db", "models", "bench"):
        sources += sorted((ROOT / package).rglob("*.py"))
    for source in sources:
        for name in set(re.findall(r"(?<![\w/.])docs/[\w.-]+\.md", _text(source))):
            assert (ROOT / name).exists(), f"{source.relative_to(ROOT)} names missing {name}"


def test_every_examples_file_named_by_the_docs_and_the_cli_exists() -> None:
    from medbatch.cli import build_parser
    from tests.test_cli_first_use import _subcommands

    texts = [_text(d) for d in DOCS]
    texts += [p.format_help() for p in _subcommands(build_parser())]
    named = {m for t in texts for m in re.findall(r"examples/[\w./-]*\w", t)}
    assert len(named) >= 6
    for name in named:
        matches = list(ROOT.glob(name + "*"))  # a PLINK prefix names .bed/.bim/.fam
        assert matches, f"{name} is named in the docs but not shipped"


def test_named_variables_are_settings_and_every_setting_is_documented() -> None:
    fields = {f"MEDBATCH_{name.upper()}" for name in Settings.model_fields}
    for doc in DOCS:
        for var in set(re.findall(r"MEDBATCH_[A-Z0-9_]*[A-Z0-9]", _text(doc))):
            assert var in fields | TEST_ONLY | COMPOSE_ONLY, (
                f"{doc.relative_to(ROOT)} names unknown {var}"
            )
    # `make test` empties a Redis database and makes a PostgreSQL one: the README says where.
    for var in TEST_ONLY:
        assert var in _text(ROOT / "README.md"), f"{var} (tests/conftest.py) is not in the README"
    config = _text(ROOT / "docs" / "configuration.md")
    for var in fields:
        # A row may group variables: `MEDBATCH_STAT_MAX_BATCH_SIZE` / `_MAX_DELAY_MS`.
        head, _, tail = var.removeprefix("MEDBATCH_").partition("_")
        grouped = f"MEDBATCH_{head}_" in config and f"`_{tail}`" in config
        assert var in config or grouped, f"{var} is not in docs/configuration.md"


def test_the_architecture_names_every_queue_and_the_registry_threshold_is_quoted() -> None:
    from worker.queues import ALL_QUEUES

    architecture = _text(ROOT / "docs" / "architecture.md")
    start = architecture.index("```")
    diagram = architecture[start : architecture.index("```", start + 3)]
    for queue in ALL_QUEUES:
        assert queue in diagram
    registry = json.loads(_text(ROOT / "models" / "cases" / "registry.json"))
    entries = registry["models"] if isinstance(registry, dict) else registry
    (whas,) = [m for m in entries if m["name"] == "whas500-mortality"]
    models = _text(ROOT / "docs" / "models.md")
    assert f"threshold, {whas['threshold']}" in models
    for other in re.findall(r"threshold,? (0\.\d+)", models):
        assert float(other) in {m["threshold"] for m in entries}


def test_every_worker_metric_is_in_the_api_docs_table() -> None:
    """docs/api.md's table of a worker's metrics lists each one worker/metrics.py defines."""
    from prometheus_client import Counter

    from worker import metrics

    defined = {
        f"{m._name}_total" if isinstance(m, Counter) else m._name
        for m in vars(metrics).values()
        if hasattr(m, "_name") and hasattr(m, "_labelnames")
    }
    documented = set(re.findall(r"^\| `(medbatch_\w+)`", _text(ROOT / "docs/api.md"), re.M))
    assert defined - documented == set()


def test_every_documented_default_is_the_setting_s_default() -> None:
    """docs/configuration.md's default column, row by row, against Settings' defaults."""
    fields = Settings.model_fields
    rows = re.findall(
        r"^\| (`MEDBATCH_[^|]*) \| ([^|]*) \|", _text(ROOT / "docs" / "configuration.md"), re.M
    )
    checked = set()
    for names_cell, default_cell in rows:
        names = re.findall(r"`([A-Z0-9_]+)`", names_cell)
        head = names[0].removeprefix("MEDBATCH_").split("_", 1)[0]
        names = [n if n.startswith("MEDBATCH_") else f"MEDBATCH_{head}{n}" for n in names]
        defaults = re.findall(r"`([^`]+)`", default_cell)
        for i, name in enumerate(names):
            default = fields[name.removeprefix("MEDBATCH_").lower()].default
            if default is None:  # unset: the docs say what it means instead
                checked.add(name)
                continue
            assert len(defaults) == len(names), f"{names_cell}: one default per variable"
            documented = defaults[i]
            if isinstance(default, bool):
                assert documented == str(default).lower(), name
            elif isinstance(default, int | float):
                assert float(documented) == default, name
            else:
                assert documented == str(default), name
            checked.add(name)
    assert len(checked) >= len(fields) - 2


def _doc_commands(text: str) -> tuple[list[str], list[str]]:
    """``(commands in shell blocks, inline `medbatch …` spans)``: a block's command is run as
    written (continuations joined, comments and redirections off); a span may be a sketch
    (``[--client NAME]``)."""
    blocks = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line):
                found = re.search(r"(?:^|\$\()\s*(medbatch\s+[a-z].*)", part.strip())
                if found:
                    command = re.sub(r"\s#.*$", "", found.group(1))
                    blocks.append(re.sub(r"\s*\d?>.*$", "", command).rstrip(" &)"))
    return blocks, re.findall(r"`(medbatch [a-z][^`]*)`", text)


def test_every_medbatch_command_in_the_docs_parses_and_names_real_options() -> None:
    """A newcomer copies these: every command in a shell block parses as written, and every
    `--option` a span names is one of that command's."""
    import argparse
    import contextlib
    import io
    import shlex

    from medbatch.cli import build_parser

    def command_parser(argv: list[str]) -> argparse.ArgumentParser:
        parser = build_parser()
        for token in argv:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not subs or token not in subs[0].choices:
                break
            parser = subs[0].choices[token]
        return parser

    seen = 0
    for doc in DOCS:
        blocks, spans = _doc_commands(_text(doc))
        for command in blocks:
            argv = shlex.split(command)[1:]
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    build_parser().parse_args(argv)
            except SystemExit:
                raise AssertionError(
                    f"{doc.relative_to(ROOT)}: `{command}`: {errors.getvalue().strip()}"
                ) from None
            seen += 1
        for span in spans:
            argv = shlex.split(span.replace("\n", " "))[1:]
            parser = command_parser(argv)
            for option in (t.split("=", 1)[0].strip("[]") for t in argv if "--" in t):
                assert option in parser._option_string_actions, (
                    f"{doc.relative_to(ROOT)}: `{span}` names {option}, which "
                    f"`{parser.prog}` does not take"
                )
            seen += 1
    assert seen >= 60


#: Modules the history table of docs/architecture.md names as they were before they were split.
_HISTORY = {"models/genome.py", "models/genome_gemm.py"}


def test_every_repository_file_the_docs_name_exists() -> None:
    """`models/cases/registry.json`, `worker/tiled.py`…: a file named in backticks under one of
    the project's folders is there (a brace list names each of its files)."""
    tops = ("api_shim", "worker", "models", "db", "medbatch", "tests", "bench", "examples", "docs")
    seen = 0
    for doc in DOCS:
        for name in re.findall(rf"`((?:{'|'.join(tops)})/[\w./{{}},-]*\w)`", _text(doc)):
            braces = re.search(r"\{([^}]*)\}", name)
            names = (
                [
                    name[: braces.start()] + part + name[braces.end() :]
                    for part in braces[1].split(",")
                ]
                if braces
                else [name]
            )
            for path in names:
                if path in _HISTORY:
                    continue
                # A PLINK prefix names .bed/.bim/.fam.
                assert list(ROOT.glob(path + "*")), f"{doc.relative_to(ROOT)} names missing {path}"
                seen += 1
    assert seen >= 50
