"""Sweeps: Ray Tune + Optuna + ASHA, MLflow run tree, retrieval, the deeplab CLI."""
