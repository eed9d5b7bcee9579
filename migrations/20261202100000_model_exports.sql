-- Exports of finished jobs' models: which agent took which job's model, when. The job's release
-- policy decides whether an export is allowed at all; every allowed one is recorded here (and in
-- the audit trail).
create table model_exports (
    id bigserial primary key,
    job_id bigint not null references jobs (id) on delete cascade,
    agent_id bigint not null references agents (id) on delete cascade,
    hospital_id bigint not null references hospitals (id),
    at timestamptz not null default now()
);
create index model_exports_by_job on model_exports (job_id, id);
