"""The Flower 1.42 app: a ServerApp on `run_job` and the one round loop, a ClientApp on the simulator's
trainer, SecAgg+ rounds and a loopback deployment (see docs/flower.md). Flower-facing code only translates."""
