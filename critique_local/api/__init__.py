"""The HTTP API: schemas, routes, auth, SSE and the generated OpenAPI document."""
