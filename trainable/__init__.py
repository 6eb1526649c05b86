"""DeepLabv3+ model, metrics, checkpoints and the Ray Train loop."""
