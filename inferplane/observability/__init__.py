"""Metrics, tracing and audit: called from every layer, importing none of them."""
