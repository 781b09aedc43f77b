"""MLflow connection in one place: tracking URI, registry URI, experiment, reachability."""

from __future__ import annotations

from training.config import Config
from training.errors import RegistryError

__all__ = ["configure_mlflow", "pinned_requirements"]


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """``pkg==installed version`` for a logged model, given explicitly so that MLflow does not
    spend a minute re-importing the model in a subprocess to infer them."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def configure_mlflow(cfg: Config) -> str:
    """Point MLflow at the configured store and return the experiment id.

    Raises RegistryError naming the URI when the tracking server cannot be reached, instead of
    MLflow's retry stack trace minutes later.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        cfg.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            location = f"{cfg.artifact_root.rstrip('/')}/{cfg.mlflow.experiment}"
            return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
        return exp.experiment_id
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {uri} is not usable: {exc}") from exc
    except Exception as exc:  # requests/SQLAlchemy errors when the server is down
        raise RegistryError(f"MLflow at {uri} cannot be reached: {exc}") from exc
