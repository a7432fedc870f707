"""Schema, as an ordered list of migrations applied once each (tracked by ``user_version``)."""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE TABLE repositories (
        id TEXT PRIMARY KEY,
        full_name TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL REFERENCES users(id),
        repository_id TEXT NOT NULL REFERENCES repositories(id),
        status TEXT NOT NULL,
        phase TEXT NOT NULL,
        request TEXT NOT NULL,
        model_id TEXT NOT NULL,
        task_kind TEXT NOT NULL,
        intent TEXT NOT NULL,
        base_ref TEXT,
        base_commit TEXT,
        summary TEXT,
        changed_paths TEXT NOT NULL DEFAULT '[]',
        diff_stats TEXT,
        patch TEXT,
        error_code TEXT,
        error_message TEXT,
        turn_count INTEGER NOT NULL DEFAULT 0,
        sandbox_id TEXT,
        sandbox_token_hash TEXT UNIQUE,
        agent_session_id TEXT,
        session_expires_at TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        started_at TEXT,
        agent_ready_at TEXT,
        finished_at TEXT
    );
    CREATE INDEX runs_user ON runs(user_id, seq DESC);
    CREATE INDEX runs_status ON runs(status);
    CREATE TABLE turns (
        run_id TEXT NOT NULL REFERENCES runs(id),
        idx INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        status TEXT NOT NULL,
        summary TEXT,
        diff_stats TEXT,
        started_at TEXT,
        finished_at TEXT,
        PRIMARY KEY (run_id, idx)
    );
    CREATE TABLE events (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE idempotency_keys (
        user_id TEXT NOT NULL REFERENCES users(id),
        key TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        run_id TEXT NOT NULL REFERENCES runs(id),
        created_at TEXT NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    """,
]

# Warm sessions, chaining, cancel, webhooks.
MIGRATIONS.append(
    """
    ALTER TABLE runs ADD COLUMN agent_url TEXT;
    ALTER TABLE runs ADD COLUMN agent_secret TEXT;
    ALTER TABLE runs ADD COLUMN sandbox_started_at TEXT;
    ALTER TABLE runs ADD COLUMN session_end_reason TEXT;
    ALTER TABLE runs ADD COLUMN chained_from_run_id TEXT;
    ALTER TABLE runs ADD COLUMN chained_to_run_id TEXT;
    ALTER TABLE turns ADD COLUMN tree TEXT;
    ALTER TABLE users ADD COLUMN webhook_secret TEXT;
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs(id),
        url TEXT NOT NULL,
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_status_code INTEGER,
        last_error TEXT,
        created_at TEXT NOT NULL,
        delivered_at TEXT
    );
    CREATE INDEX webhook_due ON webhook_deliveries(state, next_attempt_at);
    CREATE INDEX webhook_run ON webhook_deliveries(run_id, created_at);
    """
)

# Billing: plans, credit ledger, metered model calls, per-run BYOK key.
MIGRATIONS.append(
    """
    ALTER TABLE users ADD COLUMN plan TEXT;
    ALTER TABLE runs ADD COLUMN byok_key TEXT;
    ALTER TABLE runs ADD COLUMN usage_turn INTEGER;
    CREATE TABLE credit_ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL REFERENCES users(id),
        amount REAL NOT NULL,
        reason TEXT NOT NULL,
        run_id TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX credit_user ON credit_ledger(user_id);
    CREATE TABLE model_calls (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL REFERENCES users(id),
        run_id TEXT,
        turn_idx INTEGER,
        model_id TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        credits REAL NOT NULL,
        estimated INTEGER NOT NULL,
        billed_to TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX model_calls_run ON model_calls(run_id, turn_idx);
    """
)

# Publishing and validation: the base branch, per-turn publish settings and outcomes,
# validation results, and the pull request of each run.
MIGRATIONS.append(
    """
    ALTER TABLE runs ADD COLUMN base_branch TEXT;
    ALTER TABLE runs ADD COLUMN validation TEXT;
    ALTER TABLE turns ADD COLUMN publish TEXT;
    ALTER TABLE turns ADD COLUMN publish_outcome TEXT;
    ALTER TABLE turns ADD COLUMN validation TEXT;
    CREATE TABLE pull_requests (
        run_id TEXT PRIMARY KEY REFERENCES runs(id),
        host TEXT NOT NULL,
        repository_full_name TEXT NOT NULL,
        number INTEGER NOT NULL,
        url TEXT NOT NULL,
        branch TEXT NOT NULL,
        base_ref TEXT NOT NULL,
        head_sha TEXT NOT NULL,
        state TEXT NOT NULL,
        draft INTEGER NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (host, repository_full_name, number)
    );
    """
)

# Per-repository environment secrets for validation commands (values sealed with SecretBox),
# and each run's sandbox token, sealed, for the proxy settings of later validation commands.
MIGRATIONS.append(
    """
    ALTER TABLE runs ADD COLUMN sandbox_token TEXT;
    CREATE TABLE repo_secrets (
        full_name TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (full_name, name)
    );
    """
)

# The orphan sweep finds the run of a sandbox by its id (pooled sandboxes carry no run label).
MIGRATIONS.append(
    """
    CREATE INDEX runs_sandbox ON runs(sandbox_id);
    """
)

# Patches are stored as bytes (BLOB values in the same column); how many secrets were redacted
# in the stored patch.
MIGRATIONS.append(
    """
    ALTER TABLE runs ADD COLUMN patch_redactions INTEGER NOT NULL DEFAULT 0;
    """
)

# The audit trail: who created, followed up, cancelled, ended and published which run, and how it
# went (critique-local audit); runs counted by status and phase for /metrics from an index alone.
MIGRATIONS.append(
    """
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        user_id TEXT,
        key_id TEXT,
        action TEXT NOT NULL,
        run_id TEXT,
        outcome TEXT NOT NULL,
        http_status INTEGER,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_run ON audit_log(run_id, id);
    CREATE INDEX audit_at ON audit_log(at);
    CREATE INDEX runs_status_phase ON runs(status, phase);
    """
)



# The sealed headers of a run's mcpServers (deleted when its session ends, like byok_key).
MIGRATIONS.append(
    """
    ALTER TABLE runs ADD COLUMN mcp_headers TEXT;
    """
)


# Environments (issue 16): what a repository's setup.sh produced, kept as an image or snapshot,
# and which environment each run started from.
MIGRATIONS.append(
    """
    CREATE TABLE environments (
        key TEXT PRIMARY KEY,
        repository TEXT NOT NULL,
        backend TEXT NOT NULL,
        ref TEXT NOT NULL,
        size_bytes INTEGER,
        build_ms INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL,
        stale INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE run_environments (
        run_id TEXT PRIMARY KEY,
        env_key TEXT NOT NULL,
        status TEXT NOT NULL,
        build_ms INTEGER
    );
    """
)


# Sessions that survive (issue 17): a turn's own error and its saved agent state (how many of
# the agent's messages the turn ended with, for forks), a run's pause and where it was forked from.
MIGRATIONS.append(
    """
    ALTER TABLE turns ADD COLUMN error_code TEXT;
    ALTER TABLE turns ADD COLUMN error_message TEXT;
    ALTER TABLE turns ADD COLUMN agent_messages INTEGER;
    ALTER TABLE runs ADD COLUMN paused_at TEXT;
    ALTER TABLE runs ADD COLUMN forked_from_run_id TEXT;
    ALTER TABLE runs ADD COLUMN forked_from_turn INTEGER;
    """
)

# Issue 18: when the gateway received the turn's first model call (the moment a user starts
# seeing the agent work), per turn.
MIGRATIONS.append("ALTER TABLE turns ADD COLUMN first_model_call_at TEXT;")

class SchemaTooNew(Exception):
    """The database was written by a newer critique-local (migrations are forward-only)."""


def pending(version: int) -> list[tuple[int, str]]:
    """The migrations a database at schema ``version`` still needs, as (number, SQL); raises
    :class:`SchemaTooNew` when ``version`` is beyond the last migration this code knows."""
    if version > len(MIGRATIONS):
        raise SchemaTooNew(f"the database is at schema version {version}, newer than this critique-local "
                           f"({len(MIGRATIONS)}): downgrades are not supported; restore a backup made by this "
                           "version, or run the newer version")
    return list(enumerate(MIGRATIONS[version:], start=version + 1))
