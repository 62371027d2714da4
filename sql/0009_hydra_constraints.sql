-- Hydra's tables exactly as Hydra's own schema (version 87) constrains
-- them. Migration 0001 created the columns but not every constraint,
-- trigger and index of Hydra's, so a runner tested against it could write
-- rows that a database made by Hydra refuses (a status-13 step written
-- before its resolvedDrvPath, a jobset without emailOverride). On a
-- database Hydra created, every statement here finds what it would add
-- and changes nothing.

-- BuildSteps: a step always names its derivation, and status 13
-- (resolved) goes with resolvedDrvPath and nothing else does.
alter table BuildSteps alter column drvPath set not null;
do $$
begin
  if not exists (
    select 1 from pg_constraint
     where conrelid = 'buildsteps'::regclass and contype = 'c'
       and pg_get_constraintdef(oid) like '%resolveddrvpath%'
  ) then
    alter table BuildSteps
      add constraint buildsteps_check check ((status = 13) = (resolvedDrvPath is not null));
  end if;
end$$;

-- Jobsets: no default for emailOverride (Hydra's evaluator and web
-- interface always give one), and the jobset type decides which of the
-- expression fields are set.
alter table Jobsets alter column emailOverride drop default;
do $$
begin
  if not exists (
    select 1 from pg_constraint
     where conrelid = 'jobsets'::regclass and conname = 'jobsets_type_known_check'
  ) then
    -- Jobsets made before this migration (by the client API, or by hand)
    -- with no expression get the empty one Hydra's schema allows.
    update Jobsets set nixExprInput = coalesce(nixExprInput, ''),
                       nixExprPath = coalesce(nixExprPath, '')
     where type = 0 and flake is null;
    alter table Jobsets
      add constraint jobsets_type_known_check check (type = 0 or type = 1),
      add constraint jobsets_legacy_paths_check
        check ((type = 0) = (nixExprInput is not null and nixExprPath is not null and flake is null)),
      add constraint jobsets_flake_paths_check
        check ((type = 1) = (nixExprInput is null and nixExprPath is null and flake is not null));
  end if;
end$$;

-- Jobsets' notifications, which Hydra's evaluator listens to.
create or replace function notifyJobsetsAdded() returns trigger as
  'begin notify jobsets_added; return null; end;' language plpgsql;
create or replace trigger JobsetsAdded after insert on Jobsets
  execute procedure notifyJobsetsAdded();

create or replace function notifyJobsetsDeleted() returns trigger as
  'begin notify jobsets_deleted; return null; end;' language plpgsql;
create or replace trigger JobsetsDeleted after delete on Jobsets
  execute procedure notifyJobsetsDeleted();

create or replace function notifyJobsetSchedulingChanged() returns trigger as
  'begin notify jobset_scheduling_changed; return null; end;' language plpgsql;
create or replace trigger JobsetSchedulingChanged after update on Jobsets for each row
  when (((old.triggerTime is distinct from new.triggerTime) and (new.triggerTime is not null))
        or (old.checkInterval != new.checkInterval)
        or (old.enabled != new.enabled))
  execute procedure notifyJobsetSchedulingChanged();

-- FailedPaths: Hydra inserts a failed path twice without an error. (With
-- this rule PostgreSQL refuses `insert ... on conflict`; the runner does
-- not use it on this table.)
create or replace rule IdempotentInsert as on insert to FailedPaths
  where exists (select 1 from FailedPaths where path = new.path)
  do instead nothing;

-- The indexes Hydra's web interface and evaluator rely on.
create index if not exists IndexBuildsOnTimestamp on Builds(timestamp);
create index if not exists IndexBuildsOnIsCurrent on Builds(isCurrent) where isCurrent = 1;
create index if not exists IndexBuildsJobsetIdCurrentUnfinished on Builds(jobset_id)
  where isCurrent = 1 and finished = 0;
create index if not exists IndexBuildsJobsetIdCurrentFinishedStatus on Builds(jobset_id, buildstatus)
  where isCurrent = 1 and finished = 1;
create index if not exists IndexBuildsJobsetIdCurrent on Builds(jobset_id) where isCurrent = 1;
create index if not exists IndexBuildsOnJobsetIdFinishedId on Builds(jobset_id, job, finished, id desc);
create index if not exists IndexFinishedSuccessfulBuilds on Builds(jobset_id, job, finished, buildstatus, id desc)
  where buildstatus = 0 and finished = 1;
create index if not exists IndexBuildsOnKeep on Builds(keep) where keep = 1;
create index if not exists IndexBuildMetricsOnJobTimestamp on BuildMetrics(project, jobset, job, timestamp desc);
-- (Hydra's name, spelling included.)
create index if not exists IndexBuildProducstOnBuildAndType on BuildProducts(build, type);
create index if not exists IndexProjectsOnEnabled on Projects(enabled);
create index if not exists IndexJobsetEvalMembersOnEval on JobsetEvalMembers(eval);
create index if not exists IndexJobsetEvalsOnJobsetId on JobsetEvals(jobset_id, id desc) where hasNewBuilds = 1;
create index if not exists IndexJobsetIdEvals on JobsetEvals(jobset_id) where hasNewBuilds = 1;

-- Hydra's trigram index on Builds.drvPath (its search), when pg_trgm can
-- be had: creating the extension needs a superuser, and Hydra, too, goes
-- on without it, with a warning.
do $$
begin
  if not exists (select 1 from pg_indexes where indexname = 'indextrgmbuildsondrvpath') then
    create extension if not exists pg_trgm;
    create index IndexTrgmBuildsOnDrvpath on Builds using gin (drvpath gin_trgm_ops);
  end if;
exception when others then
  raise warning 'cannot create the pg_trgm index on Builds.drvPath (%); Hydra''s search of derivations is slower without it', SQLERRM;
end$$;
