"""Routing: which loaded model version answers a target (service or model) and version reference."""
