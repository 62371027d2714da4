-- What the runner refused from builders: a report or upload for an attempt
-- the sending connection does not own (any more), an output the step does
-- not have, a NAR that does not match its header. Nothing in these was
-- applied; they are kept so that operators can see a misbehaving machine.
create table hqr_rejections (
    id          bigserial primary key,
    at          timestamptz not null default now(),
    -- the connection (Welcome.machine_id) that sent it, and its machine's
    -- name when the runner still knew it
    connection  text not null,
    machine     text,
    attempt_id  text not null,
    -- 'report', 'upload', 'log', 'inputs'
    what        text not null,
    reason      text not null
);
create index hqr_rejections_at on hqr_rejections(at);
