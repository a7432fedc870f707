"""Operating a server: metrics, readiness, request context and JSON logs, the audit trail,
draining on stop, and the operator commands (doctor, sandbox gc, backup, restore, migrate,
audit)."""
