-- Which builds changed since the runner last looked, so that a restart,
-- cancel, delete or bump is applied to that build alone instead of the
-- runner re-reading the whole queue on every notification. Hydra's own
-- notifications (which carry no payload) still wake the runner; this table
-- says what to do when it wakes. Rows are deleted once applied.
create table hqr_build_changes (
    seq   bigserial primary key,
    build integer not null,
    kind  text not null check (kind in ('restarted', 'cancelled', 'deleted', 'bumped'))
);

create function hqr_note_build_change() returns trigger as $$
begin
  if tg_op = 'DELETE' then
    insert into hqr_build_changes (build, kind) values (old.id, 'deleted');
  elsif old.finished = 1 and new.finished = 0 then
    insert into hqr_build_changes (build, kind) values (new.id, 'restarted');
  elsif old.finished = 0 and new.finished = 1 and new.buildStatus = 4 then
    insert into hqr_build_changes (build, kind) values (new.id, 'cancelled');
  elsif old.globalPriority != new.globalPriority then
    insert into hqr_build_changes (build, kind) values (new.id, 'bumped');
  end if;
  return null;
end;
$$ language plpgsql;

create trigger hqr_build_changes after update or delete on Builds
  for each row execute procedure hqr_note_build_change();

-- The runner loads the queue with this partial index.
create index if not exists hqr_builds_unfinished on Builds(id) where finished = 0;
