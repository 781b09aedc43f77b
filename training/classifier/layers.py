"""Input-normalisation layers that live inside the model graph.

The shared preprocessing (``training.preprocess``) hands every model 0-255 float32 pixels; each
architecture normalises inside its own graph, so a saved model is complete and serving cannot
normalise twice or forget to. Keras has no built-in layer for the "caffe" convention of
VGG/ResNet ImageNet weights (RGB->BGR, minus the ImageNet channel means), hence this one.
Importing this module registers the layer, which loading a saved ``.keras`` file needs.
"""

from __future__ import annotations

import keras

__all__ = ["CaffePreprocess"]

# ImageNet channel means in BGR order, as keras.applications.imagenet_utils uses them.
_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="leukoflow")
class CaffePreprocess(keras.layers.Layer):
    """``keras.applications.{vgg16,vgg19,resnet50}.preprocess_input`` as a weightless layer."""

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        mean = keras.ops.convert_to_tensor(_IMAGENET_BGR_MEAN, dtype=bgr.dtype)
        return bgr - mean

    def compute_output_shape(self, input_shape):
        return input_shape
