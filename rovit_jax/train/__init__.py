"""The training loop shared by every task: mesh, sharded state, optimizer, checkpoints, metrics."""
