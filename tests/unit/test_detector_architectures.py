"""The detector architecture table: names, yamls, and a helpful error for a typo."""

from __future__ import annotations

import pytest

from training.config import load_config
from training.detector.architectures import ARCHITECTURES, get_spec
from training.errors import ConfigError
from training.families import get_family


def test_both_yolo_families_are_in_the_table() -> None:
    assert {s.family for s in ARCHITECTURES.values()} == {"YOLOv5", "YOLOv8"}
    assert get_spec("yolov5nu").model_yaml == "yolov5nu.yaml"
    with pytest.raises(ConfigError, match="did you mean 'yolov8n'"):
        get_spec("yolo8n")


def test_the_detector_family_trains_its_config_list() -> None:
    cfg = load_config(detector={"architectures": ["yolov5nu", "yolov8n"]})
    family = get_family("detector")
    assert family.takes_architecture and family.compare_architectures
    assert family.architectures(cfg) == ["yolov5nu", "yolov8n"]
    assert family.default_architecture(cfg) == "yolov5nu"
    assert get_family("classifier").architectures(cfg) == cfg.classifier.architectures
