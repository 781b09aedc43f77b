"""`leukoflow evaluate`'s model references: what a user types, read without MLflow."""

from __future__ import annotations

import pytest

from training.errors import ConfigError
from training.external import parse_model_ref


@pytest.mark.parametrize(("given", "uri", "name", "version", "alias"), [
    ("leukemia-classifier@champion", "models:/leukemia-classifier@champion",
     "leukemia-classifier", None, "champion"),
    ("leukemia-classifier/3", "models:/leukemia-classifier/3", "leukemia-classifier", "3", None),
    ("models:/leukemia-classifier/12", "models:/leukemia-classifier/12", "leukemia-classifier",
     "12", None),
    ("runs:/0123abc/model", "runs:/0123abc/model", None, None, None),
    ("models:/m-0123abc", "models:/m-0123abc", None, None, None),
])
def test_model_references(given: str, uri: str, name: str | None, version: str | None,
                          alias: str | None) -> None:
    ref = parse_model_ref(given)
    assert (ref.uri, ref.name, ref.version, ref.alias) == (uri, name, version, alias)


def test_an_unreadable_reference_says_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="leukemia-classifier@champion"):
        parse_model_ref("leukemia-classifier:3")


def test_the_model_page_lists_the_versions_external_evaluations() -> None:
    from types import SimpleNamespace

    from serving.webapp.pages_data import _version_row

    summary = "external other-lab (n=16): balanced_accuracy=0.7500"
    mv = SimpleNamespace(version="3", creation_timestamp=0, run_id="r1",
                         tags={"evaluation.abc123": summary, "architecture": "vgg16"})
    row = _version_row(mv, "balanced_accuracy", {"champion": "3"})
    assert row["evaluations"] == [{"run_id": "abc123", "summary": summary}]
