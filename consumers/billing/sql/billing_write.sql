-- The write of a recompute: records out, records in, balances moved by the spend change.
-- Planned afresh at each call, as billing_state_many is (why: see there).
CREATE OR REPLACE FUNCTION {s}.billing_write(
    p_deletes text[], p_ids text[], p_devices text[], p_users text[],
    p_starts timestamptz[], p_stops timestamptz[], p_durations numeric[],
    p_rates numeric[], p_costs numeric[], p_closed text[], p_initial numeric,
    p_who text[], p_deltas numeric[]
) RETURNS TABLE (user_id text, balance numeric, spent numeric)
LANGUAGE plpgsql SET lock_timeout = {lock_timeout}
    SET plan_cache_mode = force_custom_plan AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH gone AS (DELETE FROM {s}.usage_records WHERE record_id = ANY(p_deletes)),
    up AS (
        INSERT INTO {s}.usage_records (record_id, device_id, user_id, started_at, stopped_at,
                                      duration_seconds, rate, cost, closed_by)
        SELECT * FROM unnest(p_ids, p_devices, p_users, p_starts, p_stops, p_durations,
                             p_rates, p_costs, p_closed)
        ON CONFLICT (record_id) DO UPDATE SET device_id = EXCLUDED.device_id,
            user_id = EXCLUDED.user_id, started_at = EXCLUDED.started_at,
            stopped_at = EXCLUDED.stopped_at, duration_seconds = EXCLUDED.duration_seconds,
            rate = EXCLUDED.rate, cost = EXCLUDED.cost, closed_by = EXCLUDED.closed_by
    )
    INSERT INTO {s}.balances AS b (user_id, balance, spent)
    SELECT u, p_initial - d, d FROM unnest(p_who, p_deltas) AS t(u, d) ORDER BY u
    ON CONFLICT (user_id) DO UPDATE SET balance = b.balance - EXCLUDED.spent,
        spent = b.spent + EXCLUDED.spent
    RETURNING b.user_id, b.balance, b.spent;
END
$fn$;
