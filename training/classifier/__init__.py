"""The cell classifier family (Keras): ``predict`` (load + preprocess + infer; what serving
imports), ``train`` (the training run), ``architectures`` (the papers' models as a table), the
tf.data ``inputs``, Grad-CAM, and the deep-feature sweep. Importing this package is cheap."""
