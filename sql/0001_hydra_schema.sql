-- The tables of Hydra's schema (version 87) that the queue runner and the
-- Hydra web frontend share. Names, columns and codes follow Hydra, so a real
-- Hydra can sit on the same database. Everything is "if not exists": on a
-- database that Hydra itself created, this migration changes nothing.
--
-- Status codes (Builds.buildStatus, BuildSteps.status):
--   0 succeeded, 1 failed, 2 dependency failed (builds), 3 aborted
--   (infrastructure; retryable), 4 cancelled, 6 failed with output,
--   7 timed out, 8 cached failure (steps), 9 unsupported system/feature,
--   10 log limit exceeded, 11 output size limit exceeded,
--   12 not deterministic, 13 resolved (CA; resolvedDrvPath is set).
-- BuildSteps.busy: 0 idle, 1 preparing, 10 connecting, 20 sending inputs,
--   30 building, 35 waiting for local slot, 40 receiving outputs,
--   50 post-processing.

create table if not exists SchemaVersion (
    version integer not null
);

create table if not exists Users (
    userName        text primary key not null,
    fullName        text,
    emailAddress    text not null,
    password        text not null,
    emailOnError    integer not null default 0,
    type            text not null default 'hydra',
    publicDashboard boolean not null default false
);

create table if not exists Projects (
    name          text primary key not null,
    displayName   text not null,
    description   text,
    enabled       integer not null default 1,
    hidden        integer not null default 0,
    owner         text not null,
    homepage      text,
    declfile      text,
    decltype      text,
    declvalue     text,
    enable_dynamic_run_command boolean not null default false,
    foreign key (owner) references Users(userName) on update cascade
);

create table if not exists Jobsets (
    name             text not null,
    id               serial not null,
    project          text not null,
    description      text,
    nixExprInput     text,
    nixExprPath      text,
    errorMsg         text,
    errorTime        integer,
    lastCheckedTime  integer,
    triggerTime      integer,
    enabled          integer not null default 1,
    enableEmail      integer not null default 1,
    hidden           integer not null default 0,
    emailOverride    text not null default '',
    keepnr           integer not null default 3,
    checkInterval    integer not null default 300,
    schedulingShares integer not null default 100,
    fetchErrorMsg    text,
    forceEval        boolean,
    startTime        integer,
    type             integer not null default 0,
    flake            text,
    enable_dynamic_run_command boolean not null default false,
    constraint jobsets_schedulingshares_nonzero_check check (schedulingShares > 0),
    primary key (project, name),
    foreign key (project) references Projects(name) on delete cascade on update cascade,
    constraint Jobsets_id_unique unique (id)
);

create table if not exists Builds (
    id            serial primary key not null,
    finished      integer not null,
    timestamp     integer not null,
    jobset_id     integer not null,
    job           text not null,
    nixName       text,
    description   text,
    drvPath       text not null,
    system        text not null,
    license       text,
    homepage      text,
    maintainers   text,
    maxsilent     integer default 3600,
    timeout       integer default 36000,
    isChannel     integer not null default 0,
    isCurrent     integer default 0,
    priority      integer not null default 0,
    globalPriority integer not null default 0,
    startTime     integer,
    stopTime      integer,
    isCachedBuild integer,
    buildStatus   integer,
    size          bigint,
    closureSize   bigint,
    releaseName   text,
    keep          integer not null default 0,
    notificationPendingSince integer,
    check (finished = 0 or (stoptime is not null and stoptime != 0)),
    check (finished = 0 or (starttime is not null and starttime != 0)),
    foreign key (jobset_id) references Jobsets(id) on delete cascade
);

create table if not exists BuildOutputs (
    build  integer not null,
    name   text not null,
    path   text, -- null for a CA output not built yet
    primary key (build, name),
    foreign key (build) references Builds(id) on delete cascade
);

create table if not exists BuildSteps (
    build          integer not null,
    stepnr         integer not null,
    type           integer not null, -- 0 = build, 1 = substitution / already valid
    drvPath        text,
    busy           integer not null,
    status         integer, -- null while busy
    errorMsg       text,
    startTime      integer,
    stopTime       integer,
    machine        text not null default '',
    system         text,
    propagatedFrom integer,
    overhead       integer,
    timesBuilt     integer,
    isNonDeterministic boolean,
    resolvedDrvPath text, -- set exactly when status = 13
    primary key (build, stepnr),
    foreign key (build) references Builds(id) on delete cascade,
    foreign key (propagatedFrom) references Builds(id) on delete cascade
);

create table if not exists BuildStepOutputs (
    build   integer not null,
    stepnr  integer not null,
    name    text not null,
    path    text, -- null for a CA output not known yet
    primary key (build, stepnr, name),
    foreign key (build) references Builds(id) on delete cascade,
    foreign key (build, stepnr) references BuildSteps(build, stepnr) on delete cascade
);

create table if not exists BuildProducts (
    build       integer not null,
    productnr   integer not null,
    type        text not null,
    subtype     text not null,
    fileSize    bigint,
    sha256hash  text,
    path        text,
    name        text not null,
    defaultPath text,
    primary key (build, productnr),
    foreign key (build) references Builds(id) on delete cascade
);

create table if not exists BuildMetrics (
    build     integer not null,
    name      text not null,
    unit      text,
    value     double precision not null,
    project   text not null,
    jobset    text not null,
    job       text not null,
    timestamp integer not null,
    primary key (build, name),
    foreign key (build) references Builds(id) on delete cascade,
    foreign key (project) references Projects(name) on update cascade,
    foreign key (project, jobset) references Jobsets(project, name) on update cascade
);

create table if not exists EvaluationErrors (
    id        serial primary key not null,
    errorMsg  text,
    errorTime integer
);

create table if not exists JobsetEvals (
    id            serial primary key not null,
    jobset_id     integer not null,
    evaluationerror_id integer,
    timestamp     integer not null,
    checkoutTime  integer not null,
    evalTime      integer not null,
    hasNewBuilds  integer not null,
    hash          text not null,
    nrBuilds      integer,
    nrSucceeded   integer,
    flake         text,
    nixExprInput  text,
    nixExprPath   text,
    foreign key (jobset_id) references Jobsets(id) on delete cascade,
    foreign key (evaluationerror_id) references EvaluationErrors(id) on delete set null
);

create table if not exists JobsetEvalMembers (
    eval   integer not null references JobsetEvals(id) on delete cascade,
    build  integer not null references Builds(id) on delete cascade,
    isNew  integer not null,
    primary key (eval, build)
);

create table if not exists FailedPaths (
    path text primary key not null
);

create table if not exists SystemStatus (
    what   text primary key not null,
    status json not null
);

create table if not exists NrBuilds (
    what  text primary key not null,
    count integer not null
);
insert into NrBuilds (what, count) values ('finished', 0) on conflict do nothing;

insert into SchemaVersion (version) select 87 where not exists (select 1 from SchemaVersion);

-- Notifications the runner listens to (builds_added is sent by evaluators).
create or replace function notifyBuildsDeleted() returns trigger as
  'begin notify builds_deleted; return null; end;' language plpgsql;
create or replace trigger BuildsDeleted after delete on Builds
  execute procedure notifyBuildsDeleted();

create or replace function notifyBuildRestarted() returns trigger as
  'begin notify builds_restarted; return null; end;' language plpgsql;
create or replace trigger BuildRestarted after update on Builds for each row
  when (old.finished = 1 and new.finished = 0) execute procedure notifyBuildRestarted();

create or replace function notifyBuildCancelled() returns trigger as
  'begin notify builds_cancelled; return null; end;' language plpgsql;
create or replace trigger BuildCancelled after update on Builds for each row
  when (old.finished = 0 and new.finished = 1 and new.buildStatus = 4)
  execute procedure notifyBuildCancelled();

create or replace function notifyBuildBumped() returns trigger as
  'begin notify builds_bumped; return null; end;' language plpgsql;
create or replace trigger BuildBumped after update on Builds for each row
  when (old.globalPriority != new.globalPriority) execute procedure notifyBuildBumped();

create or replace function notifyJobsetSharesChanged() returns trigger as
  'begin notify jobset_shares_changed; return null; end;' language plpgsql;
create or replace trigger JobsetSharesChanged after update on Jobsets for each row
  when (old.schedulingShares != new.schedulingShares)
  execute procedure notifyJobsetSharesChanged();

create or replace function modifyNrBuildsFinished() returns trigger as $$
  begin
    if ((tg_op = 'INSERT' and new.finished = 1) or
        (tg_op = 'UPDATE' and old.finished = 0 and new.finished = 1)) then
      update NrBuilds set count = count + 1 where what = 'finished';
    elsif ((tg_op = 'DELETE' and old.finished = 1) or
           (tg_op = 'UPDATE' and old.finished = 1 and new.finished = 0)) then
      update NrBuilds set count = count - 1 where what = 'finished';
    end if;
    return null;
  end;
$$ language plpgsql;
create or replace trigger NrBuildsFinished after insert or update or delete on Builds
  for each row execute procedure modifyNrBuildsFinished();

-- The indices the runner's queries are bound to.
create index if not exists IndexBuildsOnFinished on Builds(finished) where finished = 0;
create index if not exists IndexBuildsOnDrvPath on Builds(drvPath);
create index if not exists IndexBuildsOnFinishedStopTime on Builds(finished, stoptime desc);
create index if not exists IndexBuildsOnNotificationPendingSince on Builds(notificationPendingSince)
  where notificationPendingSince is not null;
create index if not exists IndexBuildStepsOnBusy on BuildSteps(busy) where busy != 0;
create index if not exists IndexBuildStepsOnDrvPath on BuildSteps(drvpath);
create index if not exists IndexBuildStepsOnPropagatedFrom on BuildSteps(propagatedFrom)
  where propagatedFrom is not null;
create index if not exists IndexBuildStepsOnStopTime on BuildSteps(stopTime desc)
  where startTime is not null and stopTime is not null;
create index if not exists IndexBuildStepOutputsOnPath on BuildStepOutputs(path);
create index if not exists IndexBuildOutputsPath on BuildOutputs using hash(path);
create index if not exists IndexBuildProductsOnBuild on BuildProducts(build);
create index if not exists IndexJobsetEvalMembersOnBuild on JobsetEvalMembers(build);
