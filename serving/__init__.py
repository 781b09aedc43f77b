"""BentoML serving of the champion models: services, API-key auth, upload decoding.

Importing this package is light: neither TensorFlow nor torch is imported until a model
service starts in its own process (see ``serving.service``).
"""
