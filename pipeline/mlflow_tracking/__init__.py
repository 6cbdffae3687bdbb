"""MLflow: where the tracking store is and how it is prepared (``mlflow_store``), runs and their params
and metrics from any node (``tracking``: a client on the head, forwarded to from the workers), logged
models read back (``model_store``), system metrics (``system_metrics``) and the UI (``mlflow_ui``).
Only the head opens the store; workers reach it through Ray."""
