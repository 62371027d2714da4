-- Content-addressed derivations (Hydra's CA support): output paths are only
-- known after the build, and a resolved step records its resolved .drv.
-- Idempotent, so it also applies to a Hydra database that has these already.

alter table BuildOutputs alter column path drop not null;
alter table BuildStepOutputs alter column path drop not null;
alter table BuildSteps add column if not exists resolvedDrvPath text;
