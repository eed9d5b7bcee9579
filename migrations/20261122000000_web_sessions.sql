-- Dashboard log-ins. The browser holds a 256-bit token in an HttpOnly cookie; only its SHA-256
-- is stored. Logging out deletes the row; expired rows are purged by the coordinator's sweep.
create table web_sessions (
    id bigserial primary key,
    token_hash bytea not null unique,
    user_id bigint not null references users (id) on delete cascade,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null
);
create index web_sessions_expiry on web_sessions (expires_at);
