from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import Config, load_config
from training.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_documented_yaml_equals_schema_defaults():
    documented = yaml.safe_load((REPO / "configs" / "leukoflow.yaml").read_text())
    documented["home"] = str(Path(documented["home"]).resolve())
    assert documented == Config().dump()


def test_precedence_file_env_overrides(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("classifier: {epochs: 3, batch_size: 5}\ndetector: {imgsz: 128}\n")
    monkeypatch.setenv("LEUKOFLOW_CLASSIFIER__EPOCHS", "4")
    cfg = load_config(path, detector={"imgsz": 96})
    assert cfg.classifier.batch_size == 5  # file
    assert cfg.classifier.epochs == 4  # env beats file
    assert cfg.detector.imgsz == 96  # override beats file
    assert cfg.detector.epochs == 100  # default untouched


def test_config_file_from_env(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("gate: {max_regression: 0.05}\n")
    monkeypatch.setenv("LEUKOFLOW_CONFIG", str(path))
    assert load_config().gate.max_regression == 0.05


def test_unknown_key_suggests_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classifier: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'classifier.epoch'; did you mean 'epochs'"):
        load_config(path)


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"'split.test_fraction' = 1.5"):
        load_config(split={"test_fraction": 1.5})


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_derived_locations(tmp_path):
    cfg = load_config(home=tmp_path)
    assert cfg.uri("landing") == (tmp_path / "landing").as_uri()
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert load_config(home=tmp_path, storage={"landing_uri": "s3://b/l"}).uri("landing") == \
        "s3://b/l"
