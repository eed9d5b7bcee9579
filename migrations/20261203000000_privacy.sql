-- Privacy per hospital and per visit.
--
-- A hospital admin may cap the ε the hospital spends on one job; consent to a job whose projected
-- ε is over it is refused, and the cap travels with every assignment so that the agent refuses too.
alter table hospitals add column max_epsilon double precision
    check (max_epsilon is null or max_epsilon > 0);

-- What each agent reports of its data (beats for training and testing under the default cut), so
-- that a job's ε can be projected before consent: the sampling rate is batch size over this count.
alter table agents add column train_samples bigint check (train_samples is null or train_samples >= 0),
                   add column test_samples bigint check (test_samples is null or test_samples >= 0),
                   add column data_reported_at timestamptz;

-- A visit's DP-SGD as its agent ran it (the report's `dp`), the ε its hospital had spent on the job
-- after it, and what the coordinator received and sent, per message kind:
-- [{"direction": "up"|"down", "kind": …, "count": …, "bytes": …}].
alter table visits add column dp jsonb,
                   add column epsilon_spent double precision,
                   add column message_kinds jsonb;
