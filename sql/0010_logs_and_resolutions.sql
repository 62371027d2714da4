-- Build logs are published to the destination caches too, as
-- `log/<drv base name>` (where `nix log --store <cache>` finds them, and
-- where Hydra's runner puts them): a third kind of upload, whose item is
-- the `.drv` path.
alter table hqr_uploads drop constraint hqr_uploads_kind_check;
alter table hqr_uploads add constraint hqr_uploads_kind_check
  check (kind in ('path', 'realisation', 'log'));

-- The runner looks up, when a resolved derivation's step ends, the
-- status-13 rows that point at it (each such build gets a row of the
-- resolved step, as Hydra's web interface expects): index-bound.
create index if not exists hqr_buildsteps_resolved on BuildSteps(resolvedDrvPath)
  where status = 13;
