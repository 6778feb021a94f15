-- bench/compare.sh: a session lock in PostgreSQL, one key per client (as lockd-bench's
-- default, one key per connection): a pair is one acquire and one release.
SELECT pg_advisory_lock(CAST(:client_id AS bigint));
SELECT pg_advisory_unlock(CAST(:client_id AS bigint));
