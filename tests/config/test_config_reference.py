"""docs/config.md is generated from the schema and must be up to date."""

from __future__ import annotations

from pathlib import Path

from jaxpref.config import config_reference_markdown

DOC = Path(__file__).parents[2] / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == config_reference_markdown(), (
        "docs/config.md is out of date; run: python -m jaxpref.config.reference > docs/config.md"
    )


def test_reference_documents_every_field():
    text = config_reference_markdown()
    from jaxpref.config import DatasetConfig, JaxprefConfig

    for name in [*JaxprefConfig.model_fields, *DatasetConfig.model_fields]:
        assert f"| `{name}` |" in text, name
