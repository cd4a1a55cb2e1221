"""The ways out of the exporter: REST, SSE, Prometheus and OTLP, rendered from the aggregate."""
