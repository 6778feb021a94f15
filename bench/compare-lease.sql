-- bench/compare.sh: a durable lease row in PostgreSQL, in the style of pglock: take the row if
-- it is free or its lease ran out (with a fresh 32-character token), then delete it only if
-- the token is still ours. Each statement commits on its own (synchronous_commit on), so a
-- pair is two commits, as a detached lease's acquire and release are in lockd.
\set token random(1, 9223372036854775807)
INSERT INTO locks AS l (name, token, expires_at)
  VALUES ('k' || CAST(:client_id AS text), md5(CAST(:token AS text)), now() + interval '30 seconds')
  ON CONFLICT (name) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at
  WHERE l.expires_at < now()
  RETURNING token;
DELETE FROM locks WHERE name = 'k' || CAST(:client_id AS text) AND token = md5(CAST(:token AS text));
