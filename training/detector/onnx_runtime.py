"""The detector exported by Ultralytics (``format="onnx"``) run by ONNX Runtime, torch-free.

Ultralytics' ONNX graph ends before its post-processing: it takes a letterboxed ``(1, 3, s, s)``
RGB tensor in 0-1 and answers ``(1, 4 + classes, anchors)`` (centre x, centre y, width, height
in letterbox pixels, then per-class scores). The letterbox, the per-class NMS and the mapping
back to the image are re-done here in numpy, after Ultralytics' own ``LetterBox``,
``non_max_suppression`` and ``scale_boxes`` (same padding colour 114, same rounding, the class
offset trick for per-class NMS, IoU 0.7, at most 300 boxes), so the answer has the same shape
as :func:`training.detector.predict.detect` and the publish step can compare the two.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np

from training.boxes import box_iou

__all__ = ["ONNX_FILE", "OnnxDetector", "letterbox", "nms", "onnx_path"]

ONNX_FILE = "onnx/model.onnx"  # inside a published model dir, written by training.publish.export
_PAD = 114
_MAX_WH = 7680.0  # Ultralytics' per-class box offset


def onnx_path(model_dir: Path) -> Path:
    """Where the publish step puts a detector's ONNX export (absent: not exported)."""
    return Path(model_dir) / ONNX_FILE


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """``(h, w, 3)`` uint8 RGB -> ``(1, 3, size, size)`` float32 in 0-1, the gain and the
    (left, top) padding, as Ultralytics' ``LetterBox(auto=False, center=True)`` makes them."""
    import cv2

    h, w = rgb.shape[:2]
    gain = min(size / h, size / w)
    new_w, new_h = round(w * gain), round(h * gain)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    img = rgb if (new_w, new_h) == (w, h) else cv2.resize(rgb, (new_w, new_h),
                                                           interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT,
                             value=(_PAD, _PAD, _PAD))
    x = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    return x, gain, (float(left), float(top))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, best score first (torchvision's ``nms`` semantics)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


class OnnxDetector:
    """A YOLO ONNX export and the numpy steps around it; ``detect`` answers like
    :func:`training.detector.predict.detect`."""

    def __init__(self, path: str | Path, classes: list[str] | None = None,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.imgsz = int(inp.shape[-1])
        # the class names the export carries (Ultralytics writes the model's own ``names``),
        # which are what the framework model answers with; else the logged metadata's
        names = self.session.get_modelmeta().custom_metadata_map.get("names")
        if names:
            parsed = ast.literal_eval(names)
            self.classes = [str(parsed[i]) for i in sorted(parsed)]
        else:
            self.classes = [str(c) for c in classes or []]

    def detect(self, image: Any, conf: float = 0.25, iou: float = 0.7,
               max_det: int = 300) -> list[dict]:
        """Boxes of one image (PIL or ``(h, w, 3)`` uint8 RGB), in its pixels, best first."""
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image,
                         dtype=np.uint8)
        height, width = rgb.shape[:2]
        x, gain, (pad_x, pad_y) = letterbox(rgb, self.imgsz)
        pred = self.session.run(None, {self.input_name: x})[0][0].T  # (anchors, 4 + classes)
        scores_all = pred[:, 4:]
        cls = scores_all.argmax(1)
        scores = scores_all[np.arange(len(cls)), cls]
        keep = scores > conf
        xywh, cls, scores = pred[keep, :4], cls[keep], scores[keep]
        xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        kept = nms(xyxy + cls[:, None] * _MAX_WH, scores, iou)[:max_det]
        xyxy, cls, scores = xyxy[kept], cls[kept], scores[kept]
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - pad_x) / gain).clip(0, width)
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - pad_y) / gain).clip(0, height)
        boxes = [{"x1": round(float(b[0]), 2), "y1": round(float(b[1]), 2),
                  "x2": round(float(b[2]), 2), "y2": round(float(b[3]), 2),
                  "label": self.classes[int(c)] if int(c) < len(self.classes) else str(int(c)),
                  "confidence": round(float(p), 4)}
                 for b, c, p in zip(xyxy, cls, scores, strict=True)]
        return sorted(boxes, key=lambda b: -b["confidence"])
