-- The batch form of billing_state, one round trip for a whole batch of device events: lock
-- every device of the batch in one sorted order (two replicas' batches queue behind each
-- other, never in a cycle), store the events once, then lock the owners of the devices that
-- got a new event (shared, sorted) and return those devices' windows (metering.select_window):
-- the events from the last stop/delete before the earliest new event on ('e'), the latest
-- rate-carrying event before that ('x'), a delete before it ('d'), and the records that start
-- in the window ('r'). Ties at equal times are broken by message id in byte order
-- (COLLATE "C"), as Python compares them.
--
-- plan_cache_mode: PL/pgSQL keeps a statement's generic plan for the whole session once it
-- has chosen one, and a plan made while statistics call the tables empty reads them in full
-- at every lookup (an ANALYZE after the deployment, before any traffic, is enough). Each call
-- is planned afresh instead, from the tables' current size; that costs a few microseconds
-- per event in batches of a hundred, where a cached plan from empty tables grew to
-- milliseconds per event at 100,000 rows.
CREATE OR REPLACE FUNCTION {s}.billing_state_many(
    p_ids text[], p_devices text[], p_kinds text[], p_ats timestamptz[], p_users text[],
    p_plans text[], p_rates numeric[]
) RETURNS TABLE (tag text, device_id text, id text, kind text, at timestamptz,
                 stopped_at timestamptz, user_id text, plan text, rate numeric,
                 duration numeric, cost numeric)
LANGUAGE plpgsql SET lock_timeout = {lock_timeout}
    SET plan_cache_mode = force_custom_plan AS $fn$
#variable_conflict use_column
DECLARE
    d text;
    touched text[];
    since timestamptz[];
    owners text[];
BEGIN
    FOR d IN SELECT DISTINCT x FROM unnest(p_devices) AS x ORDER BY x LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('billing device ' || d, 0));
    END LOOP;
    WITH ins AS (
        INSERT INTO {s}.device_events (message_id, device_id, kind, at, user_id, plan, rate)
        SELECT * FROM unnest(p_ids, p_devices, p_kinds, p_ats, p_users, p_plans, p_rates)
        ORDER BY 1
        ON CONFLICT DO NOTHING RETURNING device_id, at
    )
    SELECT coalesce(array_agg(m.d ORDER BY m.d), ARRAY[]::text[]),
           coalesce(array_agg(coalesce(c.at, '-infinity') ORDER BY m.d), ARRAY[]::timestamptz[])
      INTO touched, since
      FROM (SELECT ins.device_id AS d, min(ins.at) AS t FROM ins GROUP BY 1) m
      LEFT JOIN LATERAL (
           SELECT x.at FROM {s}.device_events x
            WHERE x.device_id = m.d AND x.kind IN ('stop', 'delete') AND x.at < m.t
            ORDER BY x.at DESC LIMIT 1) c ON true;
    -- LATERAL per device: an index lookup each, whatever the tables' statistics say
    -- ("device_id = ANY(array)" was planned as a scan of the whole table). A LIMIT, or
    -- OFFSET 0 where a device has many rows, keeps PostgreSQL from flattening the subquery
    -- into a hash join over the whole table, which is what it planned for new tables
    -- before their first ANALYZE. Here the kind and owner tests stay outside the OFFSET 0,
    -- where the planner cannot push them down: with them inside and statistics calling the
    -- table empty, it paired the device's index with all of device_events_user_idx in a
    -- bitmap AND.
    SELECT coalesce(array_agg(DISTINCT e.user_id ORDER BY e.user_id), ARRAY[]::text[]) INTO owners
      FROM unnest(touched, since) AS t(d, w), LATERAL (
           SELECT x.user_id, x.kind FROM {s}.device_events x
            WHERE x.device_id = t.d AND x.at >= t.w OFFSET 0) e
     WHERE e.kind = 'start' AND e.user_id IS NOT NULL;
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('billing user ' || o, 0))
       FROM unnest(owners) AS o ORDER BY o;
    RETURN QUERY SELECT 'e'::text, e.device_id, e.message_id, e.kind, e.at,
        NULL::timestamptz, e.user_id, e.plan, e.rate, NULL::numeric, NULL::numeric
      FROM unnest(touched, since) AS t(d, w),
           LATERAL (SELECT * FROM {s}.device_events x
                     WHERE x.device_id = t.d AND x.at >= t.w OFFSET 0) e;
    RETURN QUERY SELECT 'x'::text, e.device_id, e.message_id, e.kind, e.at,
        NULL::timestamptz, e.user_id, e.plan, e.rate, NULL::numeric, NULL::numeric
      FROM unnest(touched, since) AS t(d, w),
           LATERAL (SELECT * FROM {s}.device_events x
                     WHERE x.device_id = t.d AND x.at < t.w
                       AND x.kind IN ('start', 'update')
                       AND (x.rate IS NOT NULL OR x.plan IS NOT NULL)
                     ORDER BY x.at DESC, x.message_id COLLATE "C" DESC LIMIT 1) e;
    RETURN QUERY SELECT 'd'::text, t.d, NULL::text, NULL::text, NULL::timestamptz,
        NULL::timestamptz, NULL::text, NULL::text, NULL::numeric, NULL::numeric,
        NULL::numeric
      FROM unnest(touched, since) AS t(d, w),
           LATERAL (SELECT FROM {s}.device_events x
                     WHERE x.device_id = t.d AND x.kind = 'delete' AND x.at < t.w LIMIT 1) e;
    RETURN QUERY SELECT 'p'::text, NULL::text, p.message_id, NULL::text, p.at,
        NULL::timestamptz, p.user_id, p.plan, NULL::numeric, NULL::numeric, NULL::numeric
      FROM unnest(owners) AS o(u),
           LATERAL (SELECT * FROM {s}.user_plans x WHERE x.user_id = o.u OFFSET 0) p;
    RETURN QUERY SELECT 'r'::text, r.device_id, r.record_id, r.closed_by, r.started_at,
        r.stopped_at, r.user_id, NULL::text, r.rate, r.duration_seconds, r.cost
      FROM unnest(touched, since) AS t(d, w),
           LATERAL (SELECT * FROM {s}.usage_records x
                     WHERE x.device_id = t.d AND x.started_at >= t.w OFFSET 0) r;
END
$fn$;
