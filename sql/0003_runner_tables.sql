-- The queue runner's own tables. Additions only: Hydra's tables are never
-- renamed or dropped. Prefixed hqr_ so they are easy to tell apart.

-- Every dispatch of a step to a machine. The row is written before the job
-- is sent; a report is applied only if its attempt is still open and owned
-- by the reporting machine.
create table hqr_attempts (
    id          uuid primary key,
    build       integer not null references Builds(id) on delete cascade,
    stepnr      integer not null,
    drv_path    text not null,
    machine     text not null,
    started_at  timestamptz not null default now(),
    finished_at timestamptz,
    -- null while running; otherwise a BuildSteps status code
    outcome     integer,
    foreign key (build, stepnr) references BuildSteps(build, stepnr) on delete cascade
);
create index hqr_attempts_open on hqr_attempts(drv_path) where finished_at is null;

-- Output paths of content-addressed derivations, by derivation and output,
-- as the runner recorded them. Dependents resolve against these (never
-- against whichever builder built the input), and a restarted runner
-- rebuilds its CA state from them.
create table hqr_realisations (
    drv_path   text not null,
    output     text not null,
    out_path   text not null,
    created_at timestamptz not null default now(),
    primary key (drv_path, output)
);
