"""The detector architectures, as a table: name -> Ultralytics model yaml + where it comes from.

The seed paper (Bhavana & Balakrishna, see DESIGN.md) compares YOLOv5 and YOLOv8 for
white-cell detection; both families are trained here from their model yamls, side by side, the
way the classifier's architectures are (:mod:`training.classifier.architectures`). Ultralytics'
``yolov5*u`` yamls are YOLOv5's backbone and neck with the anchor-free head of YOLOv8, the
only YOLOv5 Ultralytics 8 trains; the original anchor-based YOLOv5 needs its own repository.

Adding one is a :class:`DetectorSpec` row in :data:`ARCHITECTURES`. Models start from random
weights (offline); ``detector.weights`` names a local ``.pt`` to start from instead. Importing
this module is cheap: Ultralytics is imported by the trainer, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.errors import lookup

__all__ = ["ARCHITECTURES", "DetectorSpec", "get_spec"]

BHAVANA = ("Bhavana & Balakrishna, YOLOv5 and YOLOv8 for white-blood-cell detection "
           "(the seed paper, see DESIGN.md)")


@dataclass(frozen=True)
class DetectorSpec:
    """One detector architecture: the yaml that builds it, and which family it belongs to."""

    name: str  # the Candidate's ``architecture`` and the MLflow run tag
    model_yaml: str  # Ultralytics model yaml (built offline, random init)
    family: str  # "YOLOv5" | "YOLOv8": the paper's comparison axis
    scale: str  # "n" | "s": Ultralytics' width/depth scale
    paper: str = BHAVANA


ARCHITECTURES: dict[str, DetectorSpec] = {s.name: s for s in (
    DetectorSpec("yolov5nu", "yolov5nu.yaml", "YOLOv5", "n"),
    DetectorSpec("yolov5su", "yolov5su.yaml", "YOLOv5", "s"),
    DetectorSpec("yolov8n", "yolov8n.yaml", "YOLOv8", "n"),
    DetectorSpec("yolov8s", "yolov8s.yaml", "YOLOv8", "s"),
)}


def get_spec(name: str) -> DetectorSpec:
    """The architecture called ``name``; an unknown name gets the nearest valid one."""
    return lookup(ARCHITECTURES, name, "detector architecture")
