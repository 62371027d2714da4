-- The persistent upload queue to destination stores (binary caches).
-- A row is added in the transaction that records a step's success, so no
-- output is forgotten by a runner that dies; (destination, kind, item) is
-- unique, so nothing is uploaded twice. Workers claim rows with
-- FOR UPDATE SKIP LOCKED and retry failures with backoff; a failure never
-- changes a build's status.
create table hqr_uploads (
    id           bigserial primary key,
    destination  text not null,
    -- 'path': item is a store path; 'realisation': item is
    -- '<drv path>!<output>' and out_path what it was built to
    kind         text not null check (kind in ('path', 'realisation')),
    item         text not null,
    out_path     text,
    created_at   timestamptz not null default now(),
    attempts     integer not null default 0,
    next_try     timestamptz not null default now(),
    claimed_until timestamptz,
    done_at      timestamptz,
    last_error   text,
    unique (destination, kind, item)
);
create index hqr_uploads_pending on hqr_uploads(next_try) where done_at is null;
