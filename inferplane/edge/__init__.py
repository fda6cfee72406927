"""Edge: what is checked before a request reaches routing and the engine (limits, validation)."""
