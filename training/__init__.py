"""leukoflow's library: config, storage, validation, models, evaluation, registry, publishing.

Runs without Airflow; ``dags/`` only wires these functions. Importing this package is cheap:
TensorFlow, torch, GX and MLflow are imported inside the functions that need them.
"""

import os

# MLflow 3 phones home at import unless told not to; this machine (and many sites) has no
# internet. Set before anything in the package can import mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from training.config import Config, load_config  # noqa: E402
from training.errors import (  # noqa: E402
    ConfigError,
    DataValidationError,
    LeukoflowError,
    PublishError,
    RegistryError,
    StorageError,
    TrainingError,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataValidationError",
    "LeukoflowError",
    "PublishError",
    "RegistryError",
    "StorageError",
    "TrainingError",
    "load_config",
]
__version__ = "0.1.0"
