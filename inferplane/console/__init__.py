"""The web console at `/console`: a read-only page (plain HTML, CSS and JavaScript in `static/`,
no build step, nothing from a CDN) that shows the server's models, services, latency and audit
trail by polling the server's own gated JSON and Prometheus endpoints. See docs/observability.md."""
