-- MedSplit coordinator schema. Postgres is the source of truth for identities, jobs and the
-- schedule; the coordinator's memory holds only open training sessions.

create table hospitals (
    id bigserial primary key,
    name text not null unique,
    disabled boolean not null default false,
    created_at timestamptz not null default now()
);

create table users (
    id bigserial primary key,
    email text not null unique,
    -- argon2id PHC string
    password_hash text not null,
    role text not null check (role in ('platform_admin', 'hospital_admin', 'researcher')),
    hospital_id bigint references hospitals (id),
    disabled boolean not null default false,
    created_at timestamptz not null default now(),
    check ((role = 'hospital_admin') = (hospital_id is not null))
);

create table agents (
    id bigserial primary key,
    hospital_id bigint not null references hospitals (id),
    name text not null,
    -- X25519 public key that client weights are sealed to
    public_key bytea not null,
    -- SHA-256 of the long-lived credential (256 random bits)
    credential_hash bytea not null unique,
    version text not null,
    enrolled_at timestamptz not null default now(),
    last_seen_at timestamptz,
    revoked_at timestamptz
);

create table enrolment_tokens (
    id bigserial primary key,
    hospital_id bigint not null references hospitals (id),
    -- SHA-256 of the token (256 random bits); the token itself is shown once
    token_hash bytea not null unique,
    created_by bigint not null references users (id),
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    used_at timestamptz,
    agent_id bigint references agents (id)
);

create table jobs (
    id bigserial primary key,
    name text not null,
    owner_id bigint not null references users (id),
    spec jsonb not null,
    status text not null check (status in ('pending', 'running', 'completed', 'failed', 'cancelled', 'declined')),
    rounds integer not null,
    max_attempts integer not null,
    on_failure text not null check (on_failure in ('skip', 'fail')),
    -- server layer after the last completed visit (f32 little-endian); null: initial weights
    server_checkpoint bytea,
    error text,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz
);

create table job_hospitals (
    job_id bigint not null references jobs (id) on delete cascade,
    position integer not null,
    hospital_id bigint not null references hospitals (id),
    consent text not null default 'pending' check (consent in ('pending', 'approved', 'declined')),
    decided_by bigint references users (id),
    decided_at timestamptz,
    primary key (job_id, position),
    unique (job_id, hospital_id)
);

-- One visit = one hospital's turn in one round. seq = round * hospitals + position.
create table visits (
    id bigserial primary key,
    job_id bigint not null references jobs (id) on delete cascade,
    seq integer not null,
    round integer not null,
    position integer not null,
    hospital_id bigint not null references hospitals (id),
    status text not null check (status in ('waiting', 'queued', 'running', 'completed', 'skipped', 'cancelled')),
    -- fencing token: incremented by every claim
    attempt integer not null default 0,
    -- attempts that ended without completing (lease expired, agent gave up); the job's policy
    -- applies once this reaches jobs.max_attempts
    failures integer not null default 0,
    agent_id bigint references agents (id),
    lease_expires_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    progress double precision,
    train_loss double precision,
    train_accuracy double precision,
    train_samples bigint,
    test_accuracy double precision,
    test_samples bigint,
    bytes_up bigint,
    bytes_down bigint,
    messages bigint,
    server_seconds double precision,
    wall_seconds double precision,
    last_error text,
    unique (job_id, seq)
);
create index visits_claimable on visits (hospital_id) where status = 'queued';
create index visits_running on visits (lease_expires_at) where status = 'running';

-- Client weights at the end of a visit, sealed by its agent to each agent that may train next.
create table sealed_weights (
    visit_id bigint not null references visits (id) on delete cascade,
    recipient_agent_id bigint not null references agents (id),
    sender_agent_id bigint not null references agents (id),
    sealed bytea not null,
    primary key (visit_id, recipient_agent_id)
);

create table job_events (
    id bigserial primary key,
    job_id bigint not null references jobs (id) on delete cascade,
    at timestamptz not null default now(),
    kind text not null,
    detail jsonb not null default '{}'
);
create index job_events_by_job on job_events (job_id, id);

-- Every state-changing action: who, what, when.
create table audit_log (
    id bigserial primary key,
    at timestamptz not null default now(),
    actor text not null,
    action text not null,
    target text not null,
    detail jsonb not null default '{}'
);
