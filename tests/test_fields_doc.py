"""docs/fields.md is generated from the field catalogue and must not drift from it."""

from pathlib import Path

from falco_gitlab.fields import CATALOGUE, LEGACY_FIELDS
from falco_gitlab.fields_cli import markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "fields.md"


def test_fields_doc_is_generated_from_the_catalogue() -> None:
    assert DOC.read_text(encoding="utf-8") == markdown(), (
        "docs/fields.md is stale: run falco-gitlab fields --format markdown > docs/fields.md")


def test_catalogue_keeps_the_original_plugins_25_fields() -> None:
    assert len(LEGACY_FIELDS) == 25
    assert len({f.name for f in CATALOGUE}) == len(CATALOGUE)
