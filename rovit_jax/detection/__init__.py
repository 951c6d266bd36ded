"""Open-vocabulary detection logic: targets, proposals, RoI sampling, losses and inference."""
