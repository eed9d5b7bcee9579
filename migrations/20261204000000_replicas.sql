-- Coordinator processes on this database ("replicas"). Each registers at start-up and beats every
-- second; one whose heartbeat is older than the replica timeout, or that stopped, is gone, and the
-- visits whose sessions it hosted are re-queued by any live replica.
create table replicas (
    id bigserial primary key,
    -- where it listens and the URL it was given, for operators
    address text not null,
    started_at timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    -- set by a graceful shutdown, once its sessions are handed back
    stopped_at timestamptz
);

-- The replica hosting a running visit's training session (null until the session opens; the lease
-- alone covers the time between claim and session).
alter table visits add column replica_id bigint references replicas (id) on delete set null;
create index visits_by_replica on visits (replica_id) where status = 'running';
