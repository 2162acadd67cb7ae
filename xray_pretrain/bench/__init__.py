"""Benchmarks run from the CLI (`xray-pretrain bench ...`): `step` times MAE training steps."""
