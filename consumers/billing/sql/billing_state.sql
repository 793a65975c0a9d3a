-- One round trip per event: lock the device, store the event once, lock the session owners
-- (shared), and return what the recompute needs. Each statement of a volatile function takes
-- a fresh snapshot, so rows committed while it waited for a lock are seen. Planned afresh
-- at each call, as billing_state_many is (why: see there).
CREATE OR REPLACE FUNCTION {s}.billing_state(
    p_device text, p_new text, p_kind text, p_at timestamptz, p_user text, p_plan text,
    p_rate numeric
) RETURNS TABLE (tag text, id text, kind text, at timestamptz, stopped_at timestamptz,
                 user_id text, plan text, rate numeric, duration numeric, cost numeric)
LANGUAGE plpgsql SET lock_timeout = {lock_timeout}
    SET plan_cache_mode = force_custom_plan AS $fn$
#variable_conflict use_column
DECLARE
    owners text[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('billing device ' || p_device, 0));
    IF p_new IS NOT NULL THEN
        INSERT INTO {s}.device_events (message_id, device_id, kind, at, user_id, plan, rate)
        VALUES (p_new, p_device, p_kind, p_at, p_user, p_plan, p_rate)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'dup'::text, p_new, NULL::text, NULL::timestamptz,
                NULL::timestamptz, NULL::text, NULL::text, NULL::numeric, NULL::numeric,
                NULL::numeric;
            RETURN;
        END IF;
    END IF;
    SELECT coalesce(array_agg(DISTINCT e.user_id ORDER BY e.user_id), ARRAY[]::text[]) INTO owners
      FROM {s}.device_events e
     WHERE e.device_id = p_device AND e.kind = 'start' AND e.user_id IS NOT NULL;
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('billing user ' || o, 0))
       FROM unnest(owners) AS o ORDER BY o;
    RETURN QUERY SELECT 'e'::text, e.message_id, e.kind, e.at, NULL::timestamptz,
        e.user_id, e.plan, e.rate, NULL::numeric, NULL::numeric
      FROM {s}.device_events e WHERE e.device_id = p_device;
    RETURN QUERY SELECT 'p'::text, p.message_id, NULL::text, p.at, NULL::timestamptz,
        p.user_id, p.plan, NULL::numeric, NULL::numeric, NULL::numeric
      FROM {s}.user_plans p WHERE p.user_id = ANY(owners);
    RETURN QUERY SELECT 'r'::text, r.record_id, r.closed_by, r.started_at, r.stopped_at,
        r.user_id, NULL::text, r.rate, r.duration_seconds, r.cost
      FROM {s}.usage_records r WHERE r.device_id = p_device;
END
$fn$;
