"""The white-cell detector family (Ultralytics YOLO): ``predict`` (offline set-up, load,
detect; what serving imports), ``train`` (the training run), ``yolo_data`` (dataset layout).
Importing this package is cheap: Ultralytics and torch load inside functions."""
