"""leukoflow's library: config, storage, validation, models, evaluation, registry, publishing.

Runs without Airflow; ``dags/`` only wires these functions. Importing this package is cheap:
TensorFlow, torch, GX and MLflow are imported inside the functions that need them.
"""

from training.config import Config, load_config
from training.errors import (
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
