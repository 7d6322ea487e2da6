//! Gateway API durations (GEP-2257): one to four parts, each up to five digits and a unit
//! `h`, `m`, `s` or `ms` — `10s`, `500ms`, `1h30m`, `0s`. The CRD's pattern is
//! `^([0-9]{1,5}(h|m|s|ms)){1,4}$`; the parts add up (`1m30s` is 90 seconds).

use std::time::Duration;

/// A string that is not a Gateway API duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a Gateway API duration: 1 to 4 parts of up to 5 digits, each followed by h, m, s or ms (e.g. 10s, 500ms, 1h30m)"
)]
pub struct DurationError(pub String);

/// Parses a Gateway API duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_string());
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut parts = 0;
    let mut total_ms: u64 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = text[start..i].parse().map_err(|_| bad())?;
        let unit_ms = match (bytes.get(i), bytes.get(i + 1)) {
            (Some(b'm'), Some(b's')) => {
                i += 2;
                1
            }
            (Some(b'h'), _) => {
                i += 1;
                3_600_000
            }
            (Some(b'm'), _) => {
                i += 1;
                60_000
            }
            (Some(b's'), _) => {
                i += 1;
                1_000
            }
            _ => return Err(bad()),
        };
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
        total_ms += n * unit_ms;
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(Duration::from_millis(total_ms))
}

/// Whole milliseconds, as the discovery contract carries durations.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_api_durations() {
        let ok = [
            ("0s", 0),
            ("10s", 10_000),
            ("500ms", 500),
            ("1h30m", 5_400_000),
            ("1m30s", 90_000),
            ("1h1m1s1ms", 3_661_001),
            ("99999ms", 99_999),
            ("1s1s", 2_000),
        ];
        for (text, ms) in ok {
            let d = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(millis(d), ms, "{text}");
        }
        for text in [
            "",
            "0",
            "s",
            "10",
            "1.5s",
            "-1s",
            "10S",
            "100000s",
            "1h1m1s1ms1h",
            "1d",
            "10 s",
            "1us",
            "PT10S",
        ] {
            assert!(parse(text).is_err(), "{text:?} must be refused");
        }
        let msg = parse("1.5s").expect_err("refused").to_string();
        assert!(msg.contains("\"1.5s\"") && msg.contains("500ms"), "{msg}");
    }
}
