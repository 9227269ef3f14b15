"""Differential privacy: record-level DP-SGD in each client (Opacus), client-level DP-FedAvg, accounting."""
