//! Time values as PgBouncer writes them (plain seconds, `5` or `0.5`) or with a
//! unit (`"5s"`, `"250ms"`, `"2min"`, `"1h"`).

use serde::de::{self, Deserializer, Visitor};
use std::fmt;
use std::time::Duration;

/// Parses a time string: a number with an optional unit; no unit means seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid time value {text:?}"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "ms" => 0.001,
        "us" => 0.000_001,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86400.0,
        other => return Err(format!("unknown time unit {other:?} in {text:?}")),
    };
    seconds(value * scale)
}

fn seconds(value: f64) -> Result<Duration, String> {
    if !value.is_finite() || value < 0.0 {
        return Err(format!("time value {value} must be a non-negative number"));
    }
    // `try_`: a value beyond `Duration`'s range (about 585 billion years) is an error, not a panic.
    Duration::try_from_secs_f64(value).map_err(|_| format!("time value {value} is too large"))
}

/// serde adapter: `#[serde(deserialize_with = "duration::de")]`.
pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("seconds as a number, or a string such as \"5s\" or \"250ms\"")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            seconds(v as f64).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            seconds(v as f64).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            seconds(v).map_err(E::custom)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).map_err(E::custom)
        }
    }
    d.deserialize_any(V)
}

/// Same as [`de`] for optional fields.
pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse("5 fortnights").is_err());
        assert!(parse("abc").is_err());
    }

    #[test]
    fn a_value_beyond_duration_range_is_an_error() {
        // Found by the pgbouncer_ini fuzz target: `server_lifetime = 99999999999999999999d`
        // used to panic in `Duration::from_secs_f64`.
        assert!(parse("99999999999999999999d").is_err());
        assert!(parse("1").is_ok());
    }
}
