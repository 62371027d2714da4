-- What the runner learnt about paths in its destination caches, so that a
-- restarted runner does not ask a cache about tens of thousands of paths
-- again. A path found is remembered (caches do not lose paths); a path
-- missing is asked again after a while.
create table hqr_cache_presence (
    destination text not null,
    path        text not null,
    present     boolean not null,
    nar_size    bigint,
    refs        text[] not null default '{}',
    checked_at  timestamptz not null default now(),
    primary key (destination, path)
);
