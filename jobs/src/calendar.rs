//! The UTC day and month a quota counter belongs to, and when each period resets.

/// UTC calendar day `YYYYMMDD` and month `YYYYMM` of a Unix time in milliseconds.
pub fn utc_day_and_month(ms: u64) -> (String, String) {
    // Howard Hinnant's civil-from-days.
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}{m:02}{d:02}"), format!("{y:04}{m:02}"))
}

/// Days since the epoch of a civil date (Howard Hinnant's days-from-civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds from `now_ms` until the next UTC day (`monthly == false`) or month starts.
pub fn seconds_until_reset(now_ms: u64, monthly: bool) -> u64 {
    let now_s = now_ms / 1000;
    let next_start_days = if monthly {
        let (_, month) = utc_day_and_month(now_ms);
        let y: i64 = month[..4].parse().unwrap_or(1970);
        let m: i64 = month[4..].parse().unwrap_or(1);
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        days_from_civil(y, m, 1)
    } else {
        (now_s / 86_400) as i64 + 1
    };
    (next_start_days.max(0) as u64 * 86_400).saturating_sub(now_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets() {
        // 2026-11-30T23:00:00Z: an hour to the next day and to the next month.
        let t = 1_796_079_600_000;
        assert_eq!(utc_day_and_month(t).0, "20261130");
        assert_eq!(seconds_until_reset(t, false), 3600);
        assert_eq!(seconds_until_reset(t, true), 3600);
        // 2026-12-31T00:00:00Z → 2027-01-01.
        let t = 1_798_675_200_000;
        assert_eq!(utc_day_and_month(t).0, "20261231");
        assert_eq!(seconds_until_reset(t, true), 86_400);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(utc_day_and_month(0), ("19700101".into(), "197001".into()));
        // 2024-02-29T12:00:00Z
        assert_eq!(
            utc_day_and_month(1_709_208_000_000),
            ("20240229".into(), "202402".into())
        );
        // 2026-12-31T23:59:59Z
        assert_eq!(
            utc_day_and_month(1_798_761_599_000),
            ("20261231".into(), "202612".into())
        );
    }
}
