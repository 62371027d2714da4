-- The client API's tables (section 8 of the brief).

-- Builds submitted through the API: the priority class they were queued
-- at (for aging) and the supersede key a later submission may replace
-- them by. Builds queued by Hydra's evaluator have no row here.
create table hqr_client_builds (
    build          integer primary key references Builds(id) on delete cascade,
    tenant         text not null,
    priority_class text not null check (priority_class in ('interactive', 'normal', 'background')),
    supersede_key  text,
    submitted_at   timestamptz not null default now()
);
create index hqr_client_builds_key on hqr_client_builds(tenant, supersede_key)
  where supersede_key is not null;

-- Why a build was cancelled (a cancel through the API, a supersede), and
-- whether its running steps may finish (a soft supersede).
create table hqr_cancellations (
    build  integer primary key references Builds(id) on delete cascade,
    reason text not null,
    keep_running boolean not null default false,
    at     timestamptz not null default now()
);

-- The durable event log clients watch. Rows are written (with an `id`) in
-- the transactions of the changes they describe; the active runner's
-- sequencer then numbers committed rows (`seq`: contiguous, in the order it
-- finds them), so a client that resumes after the last `seq` it saw misses
-- nothing and sees nothing twice. Clients see numbered rows only.
create table hqr_events (
    id       bigserial primary key,
    seq      bigint unique,
    kind     text not null check (kind in ('queued', 'step_started', 'step_progress',
                 'step_finished', 'resolved', 'completed', 'failed', 'cancelled')),
    builds   integer[] not null,
    -- Unix milliseconds when the row was written (not when its transaction
    -- began), so that benchmarks can time steps from the log.
    at_ms    bigint not null default (extract(epoch from clock_timestamp()) * 1000)::bigint,
    drv_path text,
    machine  text,
    status   integer,
    detail   text
);
create index hqr_events_builds on hqr_events using gin (builds);
create index hqr_events_unsequenced on hqr_events (id) where seq is null;
-- Whether a build has had its `queued` event (asked for every build the
-- runner loads: a full queue after a restart is 100,000s of lookups).
create index hqr_events_queued on hqr_events ((builds[1])) where kind = 'queued';

-- Machines an operator drained: they keep their running steps and get no
-- new ones, across runner restarts, until undrained.
create table hqr_drained_machines (
    name  text primary key,
    since timestamptz not null default now()
);

-- What loading found for each build: how many derivations of its closure
-- were built already (the client API's "cached" counter).
create table hqr_build_plans (
    build  integer primary key references Builds(id) on delete cascade,
    cached integer not null
);
