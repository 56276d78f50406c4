"""Where experiments are logged (MLflow), without loading any training code."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient


@dataclass(frozen=True)
class Tracking:
    """Where experiments are logged: an MLflow tracking URI and the folder (URI) for artifacts."""

    tracking_uri: str
    artifact_uri: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, client: MlflowClient, model_name: str) -> str:
        found = client.get_experiment_by_name(model_name)
        if found is not None:
            return str(found.experiment_id)
        return str(client.create_experiment(model_name, artifact_location=f"{self.artifact_uri}/{model_name}"))
