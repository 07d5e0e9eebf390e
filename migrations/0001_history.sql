-- Trainyard's durable history. Kubernetes is authoritative for what runs;
-- these tables remember what happened, and outlive the TrainingJob objects.
-- Every write is an upsert or an insert keyed so that a replayed write (an
-- operator restart, a retried batch) never duplicates a row.

CREATE TABLE jobs (
    uid            TEXT PRIMARY KEY,
    namespace      TEXT NOT NULL,
    name           TEXT NOT NULL,
    mode           TEXT NOT NULL,
    spec           JSONB NOT NULL,
    phase          TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    message        TEXT NOT NULL DEFAULT '',
    restarts       INTEGER NOT NULL DEFAULT 0,
    attempt        INTEGER NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL,
    started_at     TIMESTAMPTZ,
    finished_at    TIMESTAMPTZ,
    updated_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX jobs_by_namespace_phase ON jobs (namespace, phase);

-- Phase changes; a replay carries the same time and phase, so it is a no-op.
CREATE TABLE transitions (
    job_uid        TEXT NOT NULL REFERENCES jobs (uid),
    at             TIMESTAMPTZ NOT NULL,
    from_phase     TEXT,
    to_phase       TEXT NOT NULL,
    reason         TEXT NOT NULL,
    message        TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    restarts       INTEGER NOT NULL,
    PRIMARY KEY (job_uid, at, to_phase)
);

-- What the job reported: one row per (attempt, step).
CREATE TABLE progress (
    job_uid        TEXT NOT NULL REFERENCES jobs (uid),
    attempt        INTEGER NOT NULL,
    step           BIGINT NOT NULL,
    total_steps    BIGINT NOT NULL,
    loss           DOUBLE PRECISION,
    metric         DOUBLE PRECISION,
    samples_per_second DOUBLE PRECISION,
    at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_uid, attempt, step)
);
CREATE INDEX progress_of_job ON progress (job_uid, at);

-- Federated rounds (filled by the federated mode).
CREATE TABLE rounds (
    job_uid        TEXT NOT NULL REFERENCES jobs (uid),
    round          BIGINT NOT NULL,
    participants   INTEGER NOT NULL,
    rejected       INTEGER NOT NULL DEFAULT 0,
    loss           DOUBLE PRECISION,
    metric         DOUBLE PRECISION,
    at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_uid, round)
);

-- Checkpoints and adapters the job wrote.
CREATE TABLE artifacts (
    job_uid        TEXT NOT NULL REFERENCES jobs (uid),
    kind           TEXT NOT NULL CHECK (kind IN ('checkpoint', 'adapter', 'merged')),
    location       TEXT NOT NULL,
    step           BIGINT NOT NULL,
    size_bytes     BIGINT,
    at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_uid, kind, location)
);
