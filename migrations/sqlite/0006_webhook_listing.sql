-- The outbox read in `seq` order within one state: the admin API's
-- `GET /webhooks/events?state=…` pages forward (`seq > ?`) and the
-- operator page reads the latest events (`ORDER BY seq DESC LIMIT`).
-- Without this index both scanned every event in the state and sorted
-- them (with 300,000 delivered events: about 430 ms per read on SQLite,
-- against under 3 ms with it). Independent of every migration after 0004.
CREATE INDEX webhook_events_listed ON webhook_events (state, seq);
