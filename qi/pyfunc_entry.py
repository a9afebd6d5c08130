"""Models-from-code entry point: MLflow runs this file to build the served model.

Logging the model as code (not a pickled object) means loading it unpickles nothing; the
weights are a state dict read with ``torch.load(weights_only=True)``.
"""

import mlflow

from qi.serving import InspectionModel

mlflow.models.set_model(InspectionModel())
